"""Triton kernels of skiplayers (installed as ``skiplayers.triton_kernels``)."""


def op_set():
    raise NotImplementedError("backend='triton' is not implemented yet (issue #3)")
