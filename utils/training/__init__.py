"""Stage 2, training: load the teacher and the student, distil the one into the other (paper section 2.3), and plan
the memory that takes."""
