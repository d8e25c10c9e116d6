// Every op schema of skiplayers, in one place. Backends (csrc/cpu, csrc/cuda, triton_kernels) only
// implement them. Shapes and semantics are documented on the Python wrappers in skiplayers/ops.py;
// the pure-PyTorch truth of each op is skiplayers/reference.py.
#include <Python.h>
#include <torch/library.h>

// The extension is loaded with `import skiplayers._C`; the module itself carries no Python API,
// only the side effect of registering the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(skiplayers, m) {
  // Attention of packed ragged queries over packed ragged keys (prefill).
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor q_pos, Tensor k_pos, Tensor? q_tag, Tensor? k_tag, int rule, float scale) -> Tensor");
  // Caches are paged: a pool of pages k_cache/v_cache [num_pages, page_size, kv_heads, head_dim] and
  // pos_cache/tag_cache int32 [num_pages, page_size]; sequence b's slot s lives in page
  // block_table[b, s / page_size] (int32 [B, max_pages]) at offset s % page_size, and the sequence
  // holds cache_seqlens[b] slots (int32 [B]).
  //
  // Attention of a few packed queries per sequence over its paged KV cache (decode).
  // num_splits = 0 lets the backend choose the split-K factor.
  m.def(
      "cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor cu_seqlens_q, "
      "Tensor cache_seqlens, Tensor q_pos, Tensor pos_cache, Tensor? q_tag, Tensor? tag_cache, "
      "int rule, float scale, int num_splits=0) -> Tensor");
  // Rows of a packed ragged batch kept by a mask, order preserved; returns (rows, new cu_seqlens).
  m.def("compact_rows(Tensor x, Tensor cu_seqlens, Tensor keep) -> (Tensor, Tensor)");
  // Writes packed new tokens into each sequence's paged slots starting at cache_seqlens[b].
  m.def(
      "cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos_cache, Tensor(d!) tag_cache, "
      "Tensor block_table, Tensor k, Tensor v, Tensor pos, Tensor tag, Tensor cu_seqlens, "
      "Tensor cache_seqlens) -> ()");
  // Per-sequence compaction of a paged cache in place: the slots s < cache_seqlens[b] with keep[b, s]
  // (bool [B, max_pages * page_size]) move to the front of the sequence's own pages, order kept;
  // returns the new cache_seqlens.
  m.def(
      "cache_compact(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos_cache, Tensor(d!) tag_cache, "
      "Tensor block_table, Tensor cache_seqlens, Tensor keep) -> Tensor");
}
