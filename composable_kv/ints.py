"""Integer helpers shared by the host code (kernels keep their own: ``triton.cdiv`` / ``tl.cdiv``)."""


def cdiv(a, b):
    """ceil(a / b) for b > 0: ints, or integer tensors element-wise."""
    return -(-a // b)
