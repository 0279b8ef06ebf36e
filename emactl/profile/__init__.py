"""``emactl profile``: the cost of EM attention against the alternatives, side by side.

Modules, by what they hold:

* :mod:`.counting`  parameters, MACs/FLOPs and non-GEMM work on meta tensors
* :mod:`.timing`    medians after warm-up with ``torch.utils.benchmark.Timer``
* :mod:`.memory`    measured peak memory and activation memory saved for backward
* :mod:`.heads`     context modules side by side (EMAU, non-local, A², 3×3 conv, ASPP, PSP)
* :mod:`.networks`  EMANet against torchvision's DeepLabV3 and FCN and a PSP head
* :mod:`.scaling`   exponents of time and memory against the number of pixels
* :mod:`.published` the paper's cost table and our counts at its setting
* :mod:`.reference` EM attention written plainly, as the original repository does
* :mod:`.emattention` ``em_attention`` against the reference and the GEMM rate
* :mod:`.training`  EMANet's training step: fp32 eager vs bf16 + channels_last (+ compile), vs DeepLabV3
* :mod:`.settings`  the options of one run; :mod:`.report` runs, writes and prints
"""
