"""skiplayers"""

from . import _source_tree

_source_tree.install()  # source checkouts: `skiplayers.triton_kernels` is the top-level triton_kernels/
