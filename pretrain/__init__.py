"""ctxenc pretraining: context encoders (Pathak et al., CVPR 2016) trained by inpainting.

Path of the data: pretrain (runs/<name>/checkpoint-*.pth) -> transfer -> results.
"""
