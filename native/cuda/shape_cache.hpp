// The CUDA context's per-shape caches (cuDNN's algorithm per convolution shape, the
// graph API's plans, conv_autotune's timed paths): one least-recently-used map, capped.
// They kept every shape they saw: a model predicting images of many sizes (2D images
// predicted whole, many patch sizes) kept an autotune entry and a cuDNN plan (with its
// own state) per shape for the life of the model (the oneDNN primitive cache grew the
// same way and is capped the same way: native/onednn/context.cpp). Past the capacity the
// least recently used entry goes; a shape that comes back is chosen (timed) again, as on
// its first call.
// Host-only (no CUDA headers): the host emulation and the tests use it too.
#pragma once
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <list>
#include <map>
#include <utility>

#include "cmseg/cuda.hpp"

namespace cmseg {
namespace cuda {

// 256 entries per map (CMSEG_CUDA_CACHE_ENTRIES overrides it, read once), as the oneDNN
// cache. With conv_autotune a 3x3(x3) layer shape makes up to two entries per direction in
// the algorithm and plan maps (channels-last and NCDHW) and one in the path map, so one
// training shape of a depth-4 U-Net (about 15 distinct layer shapes) makes on the order of
// 100 entries, a forward-only predict at another batch size about 30: 256 holds a training
// patch at its two batch sizes (an epoch's last batch is smaller) and a few predict shapes.
// A shape that comes back after more is chosen (timed) again, in milliseconds to a second,
// instead of a plan's cuDNN state kept per shape forever.
constexpr size_t kShapeCacheCapacity = 256;

// A capacity from CMSEG_CUDA_CACHE_ENTRIES' text: a positive whole count, else `fallback`
// (said on stderr; unset or empty is silent).
inline size_t parse_cache_entries(const char* text, size_t fallback) {
  if (!text || !*text) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (*end || v < 1) {
    std::fprintf(stderr, "cmseg: CMSEG_CUDA_CACHE_ENTRIES=%s is not a positive count: keeping %zu\n", text, fallback);
    return fallback;
  }
  return (size_t)v;
}

// The capacity each new context's caches start with (the environment read once per process).
inline size_t shape_cache_capacity_default() {
  static const size_t v = parse_cache_entries(std::getenv("CMSEG_CUDA_CACHE_ENTRIES"), kShapeCacheCapacity);
  return v;
}

// A map from K (with operator<) to V holding at most capacity() entries, least recently
// used out first. Not thread-safe (a context is used by one thread at a time).
// find() returns a pointer into the cache: it is valid until the next put(),
// set_capacity() or clear() (an insertion may evict that very entry), so callers copy
// the value (a shared_ptr for a plan: an evicted plan lives on while a caller holds it).
template <class K, class V>
class ShapeCache {
 public:
  explicit ShapeCache(size_t capacity = shape_cache_capacity_default()) : capacity_(capacity ? capacity : 1) {}
  ShapeCache(const ShapeCache&) = delete;
  ShapeCache& operator=(const ShapeCache&) = delete;

  // The key's value, now the most recently used; null when absent.
  V* find(const K& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return &it->second->second;
  }
  // Stores the key's value (replacing one there) as the most recently used; past the
  // capacity the least recently used entries go (their values destroyed here).
  void put(const K& key, V value) {
    auto it = index_.find(key);
    if (it != index_.end()) {
      it->second->second = std::move(value);
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    order_.emplace_front(key, std::move(value));
    try {
      index_.emplace(key, order_.begin());
    } catch (...) {
      order_.pop_front();
      throw;
    }
    ++added_;
    trim();
  }
  // 0 counts as 1; lowering it evicts at once.
  void set_capacity(size_t entries) {
    capacity_ = entries ? entries : 1;
    trim();
  }
  size_t capacity() const { return capacity_; }
  size_t size() const { return order_.size(); }
  size_t added() const { return added_; }      // new keys stored so far (misses that were filled)
  size_t evicted() const { return evicted_; }  // entries dropped for the capacity so far
  // Every entry, most recently used first, without changing the order.
  template <class F>
  void for_each(F f) const {
    for (const auto& kv : order_) f(kv.first, kv.second);
  }
  void clear() {
    index_.clear();
    order_.clear();
  }

 private:
  void trim() {
    while (order_.size() > capacity_) {
      index_.erase(order_.back().first);
      order_.pop_back();
      ++evicted_;
    }
  }
  size_t capacity_;
  size_t added_ = 0, evicted_ = 0;
  std::list<std::pair<K, V>> order_;  // most recently used first
  std::map<K, typename std::list<std::pair<K, V>>::iterator> index_;
};

// For the tests (test_cuda, on a GPU and on the host emulation): the context's three
// caches, [0] cuDNN's algorithms (the emulation: one entry per convolution direction
// and shape it ran), [1] the graph API's plans, [2] conv_autotune's paths.
struct ConvCacheStats {
  size_t entries[3] = {0, 0, 0};
  size_t added[3] = {0, 0, 0};
  size_t evicted[3] = {0, 0, 0};
  size_t capacity = 0;
};
ConvCacheStats conv_cache_stats(Context& ctx);
void set_conv_cache_capacity(Context& ctx, size_t entries);  // every cache of the context; 0 counts as 1

}  // namespace cuda
}  // namespace cmseg
