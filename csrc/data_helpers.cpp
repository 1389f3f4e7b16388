// Sample-index, packed-index and blend-index builders for megatron_lite.data (pybind11, 64-bit indices).
//
// Semantics of build_sample_idx and build_blending_indices follow Megatron-LM's
// megatron/core/datasets/helpers.cpp; build_packed_idx is the best-fit / one-document-per-sample
// packing of megatron_lite.data.helpers (Ding et al. 2024). All are independent implementations.
// NumPy references live in megatron_lite/data/helpers.py and tests prove both equal.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

// sample_idx[i] = (position in doc_idx, token offset in that document) where sample i starts;
// sample i spans that start up to and including the start of sample i + 1, i.e. seq_length + 1
// tokens, so consecutive samples overlap by one token. Zero-length documents are skipped.
template <typename DocT>
static py::array_t<int64_t> build_sample_idx_impl(const py::array_t<int32_t, py::array::c_style>& sizes_,
                                                  const py::array_t<DocT, py::array::c_style>& doc_idx_,
                                                  int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
  const int32_t* sizes = sizes_.data();
  const DocT* doc_idx = doc_idx_.data();
  const int64_t n_sizes = sizes_.shape(0);
  const int64_t n_doc = doc_idx_.shape(0);
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t* s = out.mutable_data();
  // Errors are detected inside the single pass (a separate validation pass would double the
  // random reads of `sizes`, which dominate the run time for shuffled document orders).
  int err = 0;
  int64_t k = 0;
  {
    py::gil_scoped_release release;
    int64_t offset = 0;
    s[0] = 0;
    s[1] = 0;
    for (int64_t i = 1; i <= num_samples && !err; ++i) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (k >= n_doc) { err = 1; break; }
        const int64_t d = static_cast<int64_t>(doc_idx[k]);
        if (d < 0 || d >= n_sizes) { err = 2; break; }
        if (k + 16 < n_doc) __builtin_prefetch(sizes + doc_idx[k + 16]);  // hide the random read latency
        const int64_t len = static_cast<int64_t>(sizes[d]) - offset;
        remaining -= len;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts on its last token.
          offset += remaining + len - 1;
          remaining = 0;
        } else {
          ++k;
          offset = 0;
        }
      }
      s[2 * i] = k;
      s[2 * i + 1] = offset;
    }
  }
  if (err == 2) throw std::out_of_range("doc_idx entry " + std::to_string(k) + " out of range of sizes");
  if (err == 1) {
    int64_t total = 0;
    for (int64_t j = 0; j < n_doc; ++j) total += sizes[doc_idx[j]];
    throw std::invalid_argument("documents hold " + std::to_string(total) + " tokens, fewer than the " +
                                std::to_string(num_samples * seq_length + 1) + " that " +
                                std::to_string(num_samples) + " samples need");
  }
  return out;
}

static py::array build_sample_idx(py::array sizes, py::array doc_idx, int64_t seq_length, int64_t num_samples) {
  auto sz = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sizes);
  if (!sz || sz.ndim() != 1) throw std::invalid_argument("sizes must be a 1-D int32 array");
  if (py::dtype::of<int32_t>().is(doc_idx.dtype()))
    return build_sample_idx_impl<int32_t>(sz, py::array_t<int32_t, py::array::c_style>::ensure(doc_idx),
                                          seq_length, num_samples);
  auto di = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(doc_idx);
  if (!di || di.ndim() != 1) throw std::invalid_argument("doc_idx must be a 1-D integer array");
  return build_sample_idx_impl<int64_t>(sz, di, seq_length, num_samples);
}

// Greedy interleave: position i goes to the source with the largest
// weight * max(i, 1) - count (ties: lowest index), as in Megatron-LM;
// sources of weight 0 are skipped. `counts` are the samples
// already taken from each source before this segment; the error term uses counts taken within
// the segment, and returned sample indices continue from `counts`.
static py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights_,
                                        int64_t size,
                                        py::array_t<int64_t, py::array::c_style | py::array::forcecast> counts_) {
  const int64_t n = weights_.shape(0);
  if (n <= 0 || n > 32767) throw std::invalid_argument("need 1..32767 datasets");
  if (counts_.shape(0) != n) throw std::invalid_argument("counts must have one entry per dataset");
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  const double* w = weights_.data();
  bool any_positive = false;
  for (int64_t j = 0; j < n; ++j) any_positive = any_positive || w[j] > 0.0;
  if (!any_positive) throw std::invalid_argument("at least one blend weight must be positive");
  const int64_t* c0 = counts_.data();
  py::array_t<int16_t> ds_index(size);
  py::array_t<int64_t> ds_sample(size);
  int16_t* di = ds_index.mutable_data();
  int64_t* dsi = ds_sample.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double x = i > 1 ? static_cast<double>(i) : 1.0;
      // Zero-weight sources are never picked: with max(i, 1) a source of weight 0 would tie at
      // i == 1 (error 0) with a just-used source, and ties go to the lowest index.
      int64_t best = -1;
      double best_err = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        if (!(w[j] > 0.0)) continue;
        const double err = w[j] * x - static_cast<double>(taken[j]);
        if (best < 0 || err > best_err) {
          best_err = err;
          best = j;
        }
      }
      di[i] = static_cast<int16_t>(best);
      dsi[i] = c0[best] + taken[best];
      ++taken[best];
    }
  }
  return py::make_tuple(ds_index, ds_sample);
}

// One epoch of packed samples (the rules are in megatron_lite/data/helpers.py, build_packed_idx_numpy).
// Pieces: a document of n tokens gives n / C pieces of C = capacity tokens and a remainder piece
// of n % C tokens (if any). mode 0 ("none"): every piece is one bin. mode 1 ("best-fit"): per window
// of `window` documents, pieces sorted by length descending (stable) go to the open bin with the
// least free space that holds them (ties: the earliest bin), else to a new bin; with `fill`, the
// window's least-filled bins then donate tails of their last segments to the fullest non-full
// bins until at most one bin of the window is not full. Returns (segments [n_seg, 3] of
// (document, offset, length), bin_starts [n_bins + 1] into segments).
struct Seg {
  int64_t doc, off, len;
};

static void fill_bins(std::vector<std::vector<Seg>>& bins, std::vector<int64_t>& used, int64_t cap) {
  std::vector<int64_t> order;
  for (int64_t b = 0; b < static_cast<int64_t>(bins.size()); ++b)
    if (used[b] < cap) order.push_back(b);
  // fullest first (ties: earlier bin); receivers from the front, donors from the back
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return used[a] > used[b]; });
  int64_t i = 0, j = static_cast<int64_t>(order.size()) - 1;
  while (i < j) {
    auto& recv = bins[order[i]];
    auto& donor = bins[order[j]];
    Seg& last = donor.back();
    const int64_t t = std::min(cap - used[order[i]], last.len);
    recv.push_back(Seg{last.doc, last.off + last.len - t, t});
    last.len -= t;
    used[order[i]] += t;
    used[order[j]] -= t;
    if (last.len == 0) donor.pop_back();
    if (used[order[i]] == cap) ++i;
    if (donor.empty()) --j;
  }
}

template <typename DocT>
static void pack_window(const int32_t* sizes, int64_t n_sizes, const DocT* docs, int64_t n, int64_t cap,
                        int64_t mode, bool fill, std::vector<Seg>& out_segs, std::vector<int64_t>& out_starts) {
  std::vector<Seg> pieces;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t d = static_cast<int64_t>(docs[k]);
    if (d < 0 || d >= n_sizes) throw std::out_of_range("document id " + std::to_string(d) + " out of range of sizes");
    const int64_t len = sizes[d];
    int64_t off = 0;
    for (; len - off > cap; off += cap) pieces.push_back(Seg{d, off, cap});
    if (len - off > 0) pieces.push_back(Seg{d, off, len - off});
  }
  if (mode == 0) {
    for (const Seg& p : pieces) {
      out_segs.push_back(p);
      out_starts.push_back(static_cast<int64_t>(out_segs.size()));
    }
    return;
  }
  std::vector<int64_t> order(pieces.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int64_t>(k);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return pieces[a].len > pieces[b].len; });
  std::vector<std::vector<Seg>> bins;
  std::vector<int64_t> used;
  std::set<std::pair<int64_t, int64_t>> open;  // (free space, bin): smallest fitting free, then earliest bin
  for (int64_t k : order) {
    const Seg& p = pieces[k];
    auto it = open.lower_bound({p.len, -1});
    int64_t b;
    if (it == open.end()) {
      b = static_cast<int64_t>(bins.size());
      bins.emplace_back();
      used.push_back(0);
    } else {
      b = it->second;
      open.erase(it);
    }
    bins[b].push_back(p);
    used[b] += p.len;
    if (used[b] < cap) open.insert({cap - used[b], b});
  }
  if (fill) fill_bins(bins, used, cap);
  for (const auto& bin : bins) {
    if (bin.empty()) continue;  // a donor emptied by the fill
    out_segs.insert(out_segs.end(), bin.begin(), bin.end());
    out_starts.push_back(static_cast<int64_t>(out_segs.size()));
  }
}

template <typename DocT>
static py::tuple build_packed_idx_impl(const py::array_t<int32_t, py::array::c_style>& sizes_,
                                       const py::array_t<DocT, py::array::c_style>& docs_, int64_t capacity,
                                       int64_t mode, int64_t window, bool fill) {
  if (capacity <= 0) throw std::invalid_argument("capacity must be positive");
  if (mode != 0 && mode != 1) throw std::invalid_argument("mode must be 0 (none) or 1 (best-fit)");
  if (window < 1) throw std::invalid_argument("window must be >= 1");
  const int32_t* sizes = sizes_.data();
  const DocT* docs = docs_.data();
  const int64_t n_sizes = sizes_.shape(0), n_docs = docs_.shape(0);
  std::vector<Seg> segs;
  std::vector<int64_t> starts{0};
  {
    py::gil_scoped_release release;
    for (int64_t w = 0; w < n_docs; w += window)
      pack_window(sizes, n_sizes, docs + w, std::min(window, n_docs - w), capacity, mode, fill, segs, starts);
  }
  py::array_t<int64_t> seg_out({static_cast<int64_t>(segs.size()), static_cast<int64_t>(3)});
  int64_t* so = seg_out.mutable_data();
  for (size_t k = 0; k < segs.size(); ++k) {
    so[3 * k] = segs[k].doc;
    so[3 * k + 1] = segs[k].off;
    so[3 * k + 2] = segs[k].len;
  }
  py::array_t<int64_t> start_out(static_cast<int64_t>(starts.size()));
  std::copy(starts.begin(), starts.end(), start_out.mutable_data());
  return py::make_tuple(seg_out, start_out);
}

static py::tuple build_packed_idx(py::array sizes, py::array docs, int64_t capacity, int64_t mode, int64_t window,
                                  bool fill) {
  auto sz = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sizes);
  if (!sz || sz.ndim() != 1) throw std::invalid_argument("sizes must be a 1-D int32 array");
  if (py::dtype::of<int32_t>().is(docs.dtype()))
    return build_packed_idx_impl<int32_t>(sz, py::array_t<int32_t, py::array::c_style>::ensure(docs), capacity,
                                          mode, window, fill);
  auto di = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(docs);
  if (!di || di.ndim() != 1) throw std::invalid_argument("docs must be a 1-D integer array");
  return build_packed_idx_impl<int64_t>(sz, di, capacity, mode, window, fill);
}

PYBIND11_MODULE(_data_helpers, m) {
  m.doc() = "megatron_lite data index builders (sample index, packed index, blending index)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        py::arg("counts"));
  m.def("build_packed_idx", &build_packed_idx, py::arg("sizes"), py::arg("docs"), py::arg("capacity"),
        py::arg("mode"), py::arg("window"), py::arg("fill"));
}
