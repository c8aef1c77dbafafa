import os

import torch

# Triton reads this when it is imported: without a GPU, interpret its kernels on the CPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
