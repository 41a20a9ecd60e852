"""train.py with its real FSDP2 path on CPU processes (gloo), for tests/test_fsdp.py; run it with torchrun.

Accelerate 1.x turns FSDP on only for accelerator devices: with --use_cpu it drops the FSDP plugin and trains with
DDP (the log says DistributedType.MULTI_CPU). FSDP2 itself works over gloo, so this worker marks the run as FSDP
right after the Trainer builds its Accelerator; everything else is train.py, KDTrainer, Accelerate and torch.
After each teacher forward, each rank writes to <output_dir>/fsdp_rank<r>.json what it holds of the teacher, how many
weight files it read (RAM-efficient loading: only rank 0 reads any), whether both models' embeddings are still
tied, their rotary inv_freq, the sharded teacher's logits on a fixed probe input, and its peak RSS once both models
are loaded and once both are sharded (bench/bench_loading.py).
"""
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers.modeling_utils
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train
from utils.training.kd_trainer import KDTrainer


weight_files_read = []
_safe_open = transformers.modeling_utils.safe_open


def counting_safe_open(file, *args, **kwargs):  # what from_pretrained opens to read weights
    weight_files_read.append(str(file))
    return _safe_open(file, *args, **kwargs)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PROBE_IDS = torch.arange(3, 11)[None]  # the same input for every rank's teacher


def probe_logits(teacher):
    """The teacher's logits on PROBE_IDS, the first 16 of the vocabulary: enough to tell two functions apart."""
    with torch.no_grad():
        return teacher(input_ids=PROBE_IDS, use_cache=False).logits[..., :16].float()


def tied(model):
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


class CPUFSDPTrainer(KDTrainer):
    def __init__(self, *args, **kwargs):
        self.peak_rss_loaded_mib = peak_rss_mib()  # both models loaded, neither sharded yet
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if self.accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(self.accelerator.mixed_precision)
        # AcceleratorState copies distributed_type from PartialState's shared state again later: set both.
        PartialState().distributed_type = self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True

    def compute_loss(self, model, inputs, *args, **kwargs):
        peak_rss_sharded_mib = peak_rss_mib()  # both models sharded, before the first forward
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        parameters = list(self.teacher.parameters())
        local = [p.to_local() if isinstance(p, DTensor) else p for p in parameters]
        report = {"fsdp_module": isinstance(self.teacher, FSDPModule),
                  "local_share": sum(p.numel() for p in local) / sum(p.numel() for p in parameters),
                  # FSDP2 registers the gathered weights as plain tensors until it reshards them
                  "resharded_after_forward": all(isinstance(p, DTensor) for p in parameters),
                  "requires_grad": any(p.requires_grad for p in parameters),
                  "weight_files_read": len(weight_files_read),
                  "tied": {"student": tied(model), "teacher": tied(self.teacher)},
                  "inv_freq": {"student": model.model.rotary_emb.inv_freq.tolist(),
                               "teacher": self.teacher.model.rotary_emb.inv_freq.tolist()},
                  "teacher_probe_logits": probe_logits(self.teacher).tolist(),  # every rank gathers: collective
                  "peak_rss_mib": {"loaded": self.peak_rss_loaded_mib, "sharded": peak_rss_sharded_mib}}
        (Path(self.args.output_dir) / f"fsdp_rank{dist.get_rank()}.json").write_text(json.dumps(report))
        return loss


if __name__ == "__main__":
    train.KDTrainer = CPUFSDPTrainer
    transformers.modeling_utils.safe_open = counting_safe_open
    train.main(sys.argv[1:])
