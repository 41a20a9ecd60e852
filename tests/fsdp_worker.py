"""train.py with its real FSDP2 path on CPU processes (gloo), for tests/test_fsdp.py; run it with torchrun.

Accelerate 1.x turns FSDP on only for accelerator devices: with --use_cpu it drops the FSDP plugin and trains with
DDP (the log says DistributedType.MULTI_CPU). FSDP2 itself works over gloo, so this worker marks the run as FSDP
right after the Trainer builds its Accelerator; everything else is train.py, KDTrainer, Accelerate and torch.
After each teacher forward, each rank writes what it holds of the teacher to <output_dir>/teacher_rank<r>.json.
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train
from utils.kd_trainer import KDTrainer


class CPUFSDPTrainer(KDTrainer):
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
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        parameters = list(self.teacher.parameters())
        local = [p.to_local() if isinstance(p, DTensor) else p for p in parameters]
        report = {"fsdp_module": isinstance(self.teacher, FSDPModule),
                  "local_share": sum(p.numel() for p in local) / sum(p.numel() for p in parameters),
                  # FSDP2 registers the gathered weights as plain tensors until it reshards them
                  "resharded_after_forward": all(isinstance(p, DTensor) for p in parameters),
                  "requires_grad": any(p.requires_grad for p in parameters)}
        (Path(self.args.output_dir) / f"teacher_rank{dist.get_rank()}.json").write_text(json.dumps(report))
        return loss


if __name__ == "__main__":
    train.KDTrainer = CPUFSDPTrainer
    train.main(sys.argv[1:])
