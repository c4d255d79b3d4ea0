// Token-budget micro-batch planning: split N sequences over num_ranks x M micro-batches of at most
// max_tokens tokens each, with balanced token loads.
//
// 1. Bins. Partition the sequences into S = num_ranks * M bins with Karmarkar-Karp largest differencing
//    ("kk") or longest-processing-time greedy ("lpt"), for the smallest M (found by exponential then
//    binary search from the lower bound ceil(total / (max_tokens * num_ranks))) whose fullest bin fits
//    the budget. M = ceil(N / num_ranks) always fits: then no bin holds two sequences.
// 2. Ranks. Sort the bins by load and cut them into M chunks of num_ranks similar bins; each rank takes
//    exactly one bin of every chunk, so micro-batch k is about equally heavy on every rank (data-parallel
//    ranks step through micro-batches in lockstep). Which rank takes which bin of a chunk is again
//    decided by Karmarkar-Karp over the chunks ("kk"), or greedily, heaviest bin to the lightest rank
//    ("lpt").
// 3. "kk" also builds the "lpt" plan and returns that one instead on the rare inputs where it spreads the
//    rank loads less: k-way Karmarkar-Karp beats greedy on average, not on every input.
//
// Ties are broken by explicit keys everywhere (a bin's smallest sequence index, a tuple's creation
// order), so the plan is a deterministic function of its input; tests/packing_ref.py implements the same
// rules in Python and the tests require identical plans.
#include <algorithm>
#include <cstring>
#include <limits>
#include <queue>
#include <stdexcept>
#include <utility>

#include "rollout.h"

namespace fusedrl {
namespace {

// Flat: one bin number per sequence instead of a vector per bin. The search over the bin count builds a
// partition per step and only needs its fullest bin; per-bin index lists are built once, for the plan
// that is kept (items_of), already ascending because sequences are visited in index order.
struct Partition {
    std::vector<int64_t> load;  // (k,) tokens per bin
    std::vector<int64_t> bin;   // (n,) bin of each sequence, once finish() has run
    // What finish() needs, so that the search over the bin count, which keeps one partition of several,
    // pays for per-sequence bins only once:
    std::vector<std::pair<int64_t, int64_t>> joins;  // kk: bins (lo, hi) joined, by smallest sequence index
    std::vector<int64_t> root;                       // kk: (<= k,) smallest sequence index of bin b
    bool by_position = false;                        // lpt: bin[j] is of the j-th longest sequence
};

// Sequences by length: by_length (longest first, ties by index) and sorted_len[j] = len[by_length[j]].
struct Order {
    std::vector<int64_t> by_length, sorted_len;
};

// Bin contents in CSR form: bin b holds items[start[b] .. start[b + 1]), ascending.
struct Bins {
    std::vector<int64_t> start;  // (k + 1,)
    std::vector<int64_t> items;  // (n,)
};

Bins items_of(const Partition& p) {
    const size_t k = p.load.size();
    Bins out;
    out.start.assign(k + 1, 0);
    for (int64_t b : p.bin) ++out.start[static_cast<size_t>(b) + 1];
    for (size_t b = 0; b < k; ++b) out.start[b + 1] += out.start[b];
    out.items.resize(p.bin.size());
    std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
    for (size_t i = 0; i < p.bin.size(); ++i) out.items[static_cast<size_t>(fill[static_cast<size_t>(p.bin[i])]++)] = static_cast<int64_t>(i);
    return out;
}

// A non-empty bin inside a Karmarkar-Karp tuple; id = its smallest sequence index, the tie-breaker.
struct Entry {
    int64_t load;
    int64_t id;
};
// Function objects rather than functions: passed to std:: algorithms, these inline.
struct EntryGreater {
    bool operator()(const Entry& a, const Entry& b) const {
        return a.load > b.load || (a.load == b.load && a.id > b.id);
    }
};
constexpr EntryGreater entry_greater{};

// A k-tuple of bins in sparse form: only the non-empty bins are stored (as a min-heap by (load, id)); the
// other k - heap.size() bins are empty. Storing all k bins densely would cost O(N k) time and memory,
// which is too much at thousands of micro-batches.
struct KKTuple {
    std::vector<Entry> heap;
    int64_t max_load = 0;
};

// Priority of a tuple in the differencing queue: largest spread first, then oldest.
struct Queued {
    int64_t spread;
    int64_t tid;
    int64_t slot;
};
struct QueuedOrder {
    bool operator()(const Queued& a, const Queued& b) const {
        return a.spread < b.spread || (a.spread == b.spread && a.tid > b.tid);
    }
};

int64_t spread_of(const KKTuple& t, int64_t k) {
    const int64_t lo = static_cast<int64_t>(t.heap.size()) < k ? 0 : t.heap.front().load;
    return t.max_load - lo;
}

// k-way Karmarkar-Karp. Every sequence starts as a k-tuple (its length, 0, ..., 0). Repeatedly take the
// two tuples with the largest spread (max - min bin load) and combine them, the i-th heaviest bin of one
// with the i-th lightest of the other, until one tuple is left. Combining touches only the smaller
// tuple's non-empty bins (its empty bins pair with the other's heaviest, which stay as they are), and the
// result reuses the larger tuple's storage, so each merge costs O(b log k) for the smaller size b.
// Singleton tuples are implicit: their spread is their length, so they leave the queue in by_length
// order (ties: lower index, as their tuple id is their index) and need no storage of their own.
// Scratch memory of kk_partition, kept across the partitions of one plan's search: after the first one no
// step allocates.
struct KKWork {
    std::vector<KKTuple> tuples;
    std::vector<int64_t> free_slots;
    std::vector<Queued> queue;  // a heap under QueuedOrder
    std::vector<Entry> desc, popped;
};

// Bin contents are not tracked here: each join of two bins is logged (a sequential write), and finish()
// replays the log for the one partition the search keeps. (Linked lists per bin cost three reads and a
// write at random places of n-sized arrays per join, in every partition of the search, and a dependent
// cache miss per sequence when walked: 75% of the time at 1M sequences.) Singletons are read by sorted
// position from `ord`, sequentially.
// Returns false, with out unfinished, as soon as a bin exceeds `limit` (a bin's load only grows as tuples
// combine, so that partition cannot fit).
bool kk_partition(const Order& ord, int64_t k, int64_t limit, KKWork& w, Partition& out) {
    const std::vector<int64_t>& by_length = ord.by_length;
    const std::vector<int64_t>& sorted_len = ord.sorted_len;
    const int64_t n = static_cast<int64_t>(by_length.size());
    out.load.assign(static_cast<size_t>(k), 0);
    out.joins.clear();
    out.root.clear();
    out.by_position = false;
    if (n == 0) return true;
    if (k == 1 || n == 1) {  // one bin takes everything: joined in index order, its root is sequence 0
        for (int64_t j = 0; j < n; ++j) out.load[0] += sorted_len[j];
        for (int64_t i = 1; i < n; ++i) out.joins.push_back({0, i});
        out.root.assign(1, 0);
        return out.load[0] <= limit;
    }
    std::vector<KKTuple>& tuples = w.tuples;
    for (KKTuple& t : tuples) t.heap.clear();  // capacity kept
    std::vector<int64_t>& free_slots = w.free_slots;
    free_slots.clear();
    for (size_t slot = tuples.size(); slot-- > 0;) free_slots.push_back(static_cast<int64_t>(slot));
    struct Queue {  // std::priority_queue over a reused vector
        std::vector<Queued>& v;
        bool empty() const { return v.empty(); }
        const Queued& top() const { return v.front(); }
        void pop() { std::pop_heap(v.begin(), v.end(), QueuedOrder{}), v.pop_back(); }
        void push(const Queued& q) { v.push_back(q), std::push_heap(v.begin(), v.end(), QueuedOrder{}); }
    } queue{w.queue};
    w.queue.clear();
    int64_t next_single = 0;
    // The next tuple to combine: a stored tuple's slot, or -1 - j for the singleton of the j-th longest
    // sequence. A singleton wins a spread tie against any stored tuple: its id (sequence index) < n is older.
    auto take = [&]() -> int64_t {
        if (next_single < n && (queue.empty() || sorted_len[next_single] >= queue.top().spread)) {
            return -1 - next_single++;
        }
        const int64_t slot = queue.top().slot;
        queue.pop();
        return slot;
    };
    auto new_slot = [&](int64_t j) {
        int64_t slot;
        if (free_slots.empty()) {
            slot = static_cast<int64_t>(tuples.size());
            tuples.emplace_back();
        } else {
            slot = free_slots.back();
            free_slots.pop_back();
        }
        tuples[slot].heap.assign(1, Entry{sorted_len[j], by_length[j]});
        tuples[slot].max_load = sorted_len[j];
        return slot;
    };

    int64_t next_tid = n;
    std::vector<Entry>& desc = w.desc;
    std::vector<Entry>& popped = w.popped;
    for (int64_t remaining = n; remaining > 1; --remaining) {
        int64_t sa = take();
        int64_t sb = take();
        if (sa < 0 && sb < 0) {
            sa = new_slot(-1 - sa);
        } else if (sa < 0 || (sb >= 0 && tuples[sa].heap.size() < tuples[sb].heap.size())) {
            std::swap(sa, sb);  // A: a stored tuple with at least as many non-empty bins as B
        }
        KKTuple& A = tuples[sa];
        if (sb < 0) {
            desc.assign(1, Entry{sorted_len[-1 - sb], by_length[-1 - sb]});
        } else {
            desc.assign(tuples[sb].heap.begin(), tuples[sb].heap.end());
            std::sort(desc.begin(), desc.end(), entry_greater);
        }
        const int64_t a_size = static_cast<int64_t>(A.heap.size());
        const int64_t b_size = static_cast<int64_t>(desc.size());
        const int64_t a_empty = k - a_size;
        // B's j-th heaviest meets A's j-th lightest: A's empty bins first, then its lightest non-empty.
        const int64_t npop = std::max<int64_t>(0, b_size - a_empty);
        if (b_size == 1 && npop == 1) {
            // The common step once A is full: one sequence onto A's lightest bin. Replacing the heap's top
            // and sifting it down is one pass instead of a pop and a push (half the heap work of a
            // partition); bins are unique by id, so the heap orders them as before and the plan is the same.
            const Entry q = A.heap.front();
            const Entry e = desc[0];
            const int64_t lo = std::min(q.id, e.id);
            out.joins.push_back({lo, std::max(q.id, e.id)});
            const Entry x{q.load + e.load, lo};
            std::vector<Entry>& h = A.heap;
            const size_t size = h.size();
            size_t pos = 0;
            while (true) {
                size_t child = 2 * pos + 1;
                if (child >= size) break;
                if (child + 1 < size && entry_greater(h[child], h[child + 1])) ++child;  // the lighter child
                if (!entry_greater(x, h[child])) break;
                h[pos] = h[child];
                pos = child;
            }
            h[pos] = x;
            A.max_load = std::max(a_size > 1 ? A.max_load : 0, x.load);
            if (A.max_load > limit) return false;
            if (sb >= 0) {  // B was a stored one-bin tuple
                tuples[sb].heap.clear();
                free_slots.push_back(sb);
            }
            queue.push({spread_of(A, k), next_tid++, sa});
            continue;
        }
        popped.clear();
        for (int64_t j = 0; j < npop; ++j) {
            std::pop_heap(A.heap.begin(), A.heap.end(), entry_greater);
            popped.push_back(A.heap.back());
            A.heap.pop_back();
        }
        int64_t mx = npop < a_size ? A.max_load : 0;  // A's heaviest survives unless all of A was popped
        for (int64_t j = 0; j < b_size; ++j) {
            Entry e = desc[j];
            if (j >= a_empty) {
                const Entry& q = popped[j - a_empty];
                const int64_t lo = std::min(q.id, e.id);
                const int64_t hi = std::max(q.id, e.id);
                out.joins.push_back({lo, hi});
                e = {q.load + e.load, lo};
            }
            mx = std::max(mx, e.load);
            A.heap.push_back(e);
            std::push_heap(A.heap.begin(), A.heap.end(), entry_greater);
        }
        A.max_load = mx;
        if (mx > limit) return false;
        if (sb >= 0) {
            tuples[sb].heap.clear();  // keeps its capacity for the next tuple in this slot
            free_slots.push_back(sb);
        }
        queue.push({spread_of(A, k), next_tid++, sa});
    }

    std::vector<Entry>& bins = desc;
    bins.assign(tuples[queue.top().slot].heap.begin(), tuples[queue.top().slot].heap.end());
    std::sort(bins.begin(), bins.end(), [](const Entry& a, const Entry& b) {
        return a.load > b.load || (a.load == b.load && a.id < b.id);
    });
    out.root.resize(bins.size());
    for (size_t b = 0; b < bins.size(); ++b) out.load[b] = bins[b].load, out.root[b] = bins[b].id;
    return true;
}

// out.bin of the kept partition. kk: the joins as a forest, parent[hi] = lo, so every sequence's chain
// of parents ends at its bin's smallest index and parent[i] < i off the roots; in index order a parent's
// root is known before its child's: one pass, no pointer chasing. lpt: by sorted position -> by index.
void finish(const Order& ord, Partition& out, std::vector<int64_t>& scratch) {
    const size_t n = ord.by_length.size();
    if (out.by_position) {
        scratch.resize(n);
        for (size_t j = 0; j < n; ++j) scratch[static_cast<size_t>(ord.by_length[j])] = out.bin[j];
        out.bin.swap(scratch);
        out.by_position = false;
        return;
    }
    std::vector<int64_t>& parent = scratch;
    parent.resize(n);
    for (size_t i = 0; i < n; ++i) parent[i] = static_cast<int64_t>(i);
    for (const auto& [lo, hi] : out.joins) parent[static_cast<size_t>(hi)] = lo;
    out.bin.resize(n);
    for (size_t b = 0; b < out.root.size(); ++b) out.bin[static_cast<size_t>(out.root[b])] = static_cast<int64_t>(b);
    for (size_t i = 0; i < n; ++i) {
        const int64_t p = parent[i];
        if (p != static_cast<int64_t>(i)) {
            parent[i] = parent[static_cast<size_t>(p)];
            out.bin[i] = out.bin[static_cast<size_t>(parent[i])];
        }
    }
}

// Longest processing time: sequences from longest to shortest, each into the currently lightest bin
// (ties: lowest bin number). `sorted_len` holds the lengths in that order (longest first), so the loop reads
// and writes memory sequentially; out.bin is filled by sorted position (finish() converts it for the
// kept plan). Returns false, with out unfinished, as soon as a bin exceeds `limit`: loads only grow, so that
// partition cannot fit, and the search over the bin count skips the rest of a failing run.
//
// The lightest bin's load never decreases and every other load lies in [lightest, lightest + longest], so
// the bins wait in a ring of longest + 1 buckets keyed by load (a monotone bucket queue): O(1) per sequence
// instead of a heap's O(log k) mispredicted sift-down, which made the time per sequence grow with k (and so
// with N: ~50 ns at 10k sequences, ~300 ns at 1M). A bucket is complete before it becomes the lightest
// (a bin that leaves it lands at least 1 higher), so sorting its few bins once by number gives the heap's
// tie order exactly. Walking the ring costs one step per unit of the lightest load, so few bins with huge
// loads keep the heap.
struct LPTWork {
    std::vector<std::pair<int64_t, int64_t>> heap;  // (k,) (load, bin number)
    std::vector<int64_t> head, tail;                // (longest + 1,) first / last bin waiting at each load
    std::vector<int64_t> next;                      // (k,) the bin after it at the same load, or -1
    std::vector<int64_t> ready;                     // bins at the lightest load, ascending
    std::vector<int64_t> sort_scratch;              // (k,) scratch of sort_bins
};

// Ascending bin numbers (each < k). A bucket is a concatenation of ascending runs, one per bucket that fed
// it; std::sort on that pattern fell back to heapsort and cost twice the rest of the partition, so: an
// insertion sort for the few, an LSD radix sort (8 bits a pass, as many passes as k needs) for the many.
void sort_bins(std::vector<int64_t>& v, int64_t k, std::vector<int64_t>& scratch) {
    const size_t s = v.size();
    if (std::is_sorted(v.begin(), v.end())) return;  // common: a bucket fed by one other
    if (s <= 48) {
        for (size_t i = 1; i < s; ++i) {
            const int64_t x = v[i];
            size_t j = i;
            for (; j > 0 && v[j - 1] > x; --j) v[j] = v[j - 1];
            v[j] = x;
        }
        return;
    }
    scratch.resize(s);
    for (int shift = 0; shift < 64 && ((k - 1) >> shift) != 0; shift += 8) {
        size_t count[257] = {0};
        for (int64_t b : v) ++count[((b >> shift) & 255) + 1];
        for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
        for (int64_t b : v) scratch[count[(b >> shift) & 255]++] = b;
        v.swap(scratch);
    }
}

bool lpt_heap(const std::vector<int64_t>& sorted_len, int64_t k, int64_t limit, LPTWork& w, Partition& out) {
    // A min-heap of (load, bin number) whose top is replaced in place: one sift-down per sequence.
    auto& heap = w.heap;
    heap.resize(static_cast<size_t>(k));
    for (int64_t b = 0; b < k; ++b) heap[b] = {0, b};  // already a heap
    const size_t size = heap.size();
    for (size_t j = 0; j < sorted_len.size(); ++j) {
        std::pair<int64_t, int64_t> x = heap[0];
        x.first += sorted_len[j];
        if (x.first > limit) return false;
        out.load[x.second] = x.first;
        out.bin[j] = x.second;
        size_t pos = 0;
        while (true) {
            size_t child = 2 * pos + 1;
            if (child >= size) break;
            if (child + 1 < size && heap[child + 1] < heap[child]) ++child;
            if (!(heap[child] < x)) break;
            heap[pos] = heap[child];
            pos = child;
        }
        heap[pos] = x;
    }
    return true;
}

bool lpt_partition(const std::vector<int64_t>& sorted_len, int64_t k, int64_t limit, LPTWork& w, Partition& out) {
    const size_t n = sorted_len.size();
    out.load.assign(static_cast<size_t>(k), 0);
    out.bin.resize(n);
    if (n == 0) return true;
    const int64_t longest = sorted_len[0];
    int64_t total = 0;
    for (int64_t l : sorted_len) total += l;  // no overflow: checked at the boundary
    // The ring's size and its walk are both O(n) here; beyond (a few sequences, or loads far above their
    // lengths) the heap is cheaper.
    const int64_t cheap = 2 * static_cast<int64_t>(n) + 1024;
    if (longest >= cheap || total / k >= cheap) return lpt_heap(sorted_len, k, limit, w, out);

    const int64_t W = longest + 1;
    w.head.assign(static_cast<size_t>(W), -1);
    w.tail.resize(static_cast<size_t>(W));
    w.next.resize(static_cast<size_t>(k));
    std::vector<int64_t>& ready = w.ready;
    ready.resize(static_cast<size_t>(k));
    for (int64_t b = 0; b < k; ++b) ready[b] = b;  // all bins start empty
    size_t taken = 0;
    int64_t lightest = 0, slot = 0;  // slot = lightest % W
    for (size_t j = 0; j < n; ++j) {
        if (taken == ready.size()) {  // next non-empty bucket; one exists: all k bins wait in the ring
            do {
                ++lightest;
                if (++slot == W) slot = 0;
            } while (w.head[slot] < 0);
            ready.clear();
            for (int64_t b = w.head[slot]; b >= 0; b = w.next[b]) ready.push_back(b);
            w.head[slot] = -1;
            sort_bins(ready, k, w.sort_scratch);
            taken = 0;
        }
        const int64_t b = ready[taken++];
        const int64_t load = lightest + sorted_len[j];
        if (load > limit) return false;
        out.load[b] = load;
        out.bin[j] = b;
        int64_t s = slot + sorted_len[j];  // load % W: lightest < load <= lightest + longest
        if (s >= W) s -= W;
        w.next[b] = -1;
        if (w.head[s] < 0) {
            w.head[s] = b;
        } else {
            w.next[w.tail[s]] = b;
        }
        w.tail[s] = b;
    }
    return true;
}

// LPT puts the j-th longest sequence on a bin holding at most floor(P_j / k) tokens, P_j being the tokens
// of the sequences before it (the lightest bin holds at most the mean), so no bin ends above
// max_j floor(P_j / k) + len_j. When that fits `limit`, so does the partition, and the search over the bin
// count need not build it: one multiply-compare per sequence instead of a partition (at 1M sequences it
// settles one of the four bin counts the search tries).
bool lpt_surely_fits(const std::vector<int64_t>& sorted_len, int64_t k, int64_t limit) {
    __int128 before = 0;
    for (int64_t l : sorted_len) {
        // floor(P / k) <= limit - l  <=>  P < k * (limit - l + 1)
        if (before >= static_cast<__int128>(k) * (static_cast<__int128>(limit) - l + 1)) return false;
        before += l;
    }
    return true;
}

enum class Balance { kKK, kLPT };

// Scratch memory of one plan's partitions.
struct Work {
    KKWork kk;
    LPTWork lpt;
    std::vector<int64_t> scratch;  // (n,) of finish()
};

// Returns whether every bin holds at most `limit` tokens; out is complete (but for finish()) only when it
// does.
bool partition(const Order& order, int64_t k, Balance balance, int64_t limit, Work& w, Partition& out) {
    if (balance == Balance::kKK) {
        return kk_partition(order, k, limit, w.kk, out);
    }
    out.joins.clear();
    out.by_position = true;
    return lpt_partition(order.sorted_len, k, limit, w.lpt, out);
}

// Assign S = R * M bins (sorted heaviest first) to R ranks, one bin of every chunk of R per rank.
// Returns rank_bins[r][c] = position (in the sorted order) of rank r's c-th micro-batch.
std::vector<std::vector<int64_t>> assign_ranks(const std::vector<int64_t>& load, int64_t R, int64_t M,
                                               Balance balance) {
    std::vector<std::vector<int64_t>> rank_bins(static_cast<size_t>(R), std::vector<int64_t>(static_cast<size_t>(M)));
    if (balance == Balance::kLPT) {
        std::vector<int64_t> total(static_cast<size_t>(R), 0), order(static_cast<size_t>(R));
        for (int64_t c = 0; c < M; ++c) {
            for (int64_t r = 0; r < R; ++r) order[r] = r;
            std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return total[a] < total[b]; });
            for (int64_t j = 0; j < R; ++j) {
                const int64_t pos = c * R + j;
                rank_bins[order[j]][c] = pos;
                total[order[j]] += load[pos];
            }
        }
        return rank_bins;
    }
    // Karmarkar-Karp over chunks: chunk c is the R-tuple of bins c*R .. c*R+R-1. Combining two tuples
    // slot by slot keeps one bin per chunk per slot, so every final slot (rank) holds exactly M bins.
    struct Slot {
        int64_t load;
        int64_t key;  // smallest bin position in the slot: the tie-breaker
        std::vector<int64_t> bins;
    };
    auto slot_less = [](const Slot& a, const Slot& b) { return a.load < b.load || (a.load == b.load && a.key < b.key); };
    std::vector<std::vector<Slot>> tuples(static_cast<size_t>(M));
    auto spread = [](const std::vector<Slot>& t) {
        int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
        for (const Slot& s : t) lo = std::min(lo, s.load), hi = std::max(hi, s.load);
        return hi - lo;
    };
    std::vector<Queued> init;
    for (int64_t c = 0; c < M; ++c) {
        for (int64_t j = 0; j < R; ++j) tuples[c].push_back({load[c * R + j], c * R + j, {c * R + j}});
        init.push_back({spread(tuples[c]), c, c});
    }
    std::priority_queue<Queued, std::vector<Queued>, QueuedOrder> queue(QueuedOrder{}, std::move(init));
    int64_t next_tid = M;
    while (queue.size() > 1) {
        const int64_t sa = queue.top().slot;
        queue.pop();
        const int64_t sb = queue.top().slot;
        queue.pop();
        std::vector<Slot>& A = tuples[sa];
        std::vector<Slot>& B = tuples[sb];
        std::sort(A.begin(), A.end(), slot_less);
        std::sort(B.begin(), B.end(), [&](const Slot& a, const Slot& b) { return slot_less(b, a); });
        for (int64_t j = 0; j < R; ++j) {
            A[j].load += B[j].load;
            A[j].key = std::min(A[j].key, B[j].key);
            if (A[j].bins.size() < B[j].bins.size()) std::swap(A[j].bins, B[j].bins);  // append the shorter
            A[j].bins.insert(A[j].bins.end(), B[j].bins.begin(), B[j].bins.end());
        }
        std::vector<Slot>().swap(B);
        queue.push({spread(A), next_tid++, sa});
    }
    std::vector<Slot>& final_slots = tuples[queue.top().slot];
    // Rank 0 takes the heaviest slot (ties: smallest key).
    std::sort(final_slots.begin(), final_slots.end(), [](const Slot& a, const Slot& b) {
        return a.load > b.load || (a.load == b.load && a.key < b.key);
    });
    for (int64_t r = 0; r < R; ++r) {
        std::vector<int64_t> bins = final_slots[r].bins;
        std::sort(bins.begin(), bins.end());  // chunk order: micro-batch c comes from chunk c
        rank_bins[r] = std::move(bins);
    }
    return rank_bins;
}

using Plan = std::vector<std::vector<std::vector<int64_t>>>;  // [rank][micro-batch] -> sequence indices

// Sequence indices from longest to shortest, ties by index.
// Token lengths are small integers (a context window), so a stable counting sort, O(n + longest), beats a
// comparison sort several times over; absurd lengths fall back to std::sort.
std::vector<int64_t> longest_first(const std::vector<int64_t>& len) {
    const size_t n = len.size();
    std::vector<int64_t> order(n);
    int64_t longest = 0;
    for (int64_t l : len) longest = std::max(longest, l);
    if (longest <= 4 * static_cast<int64_t>(n) + 65536) {
        // pos[l] = first slot of length l in the output: every longer sequence comes before it.
        std::vector<int64_t> pos(static_cast<size_t>(longest) + 2, 0);
        for (int64_t l : len) ++pos[static_cast<size_t>(l)];
        int64_t acc = 0;
        for (int64_t l = longest; l >= 0; --l) {
            const int64_t c = pos[static_cast<size_t>(l)];
            pos[static_cast<size_t>(l)] = acc;
            acc += c;
        }
        for (size_t i = 0; i < n; ++i) order[static_cast<size_t>(pos[static_cast<size_t>(len[i])]++)] = static_cast<int64_t>(i);
        return order;
    }
    for (size_t i = 0; i < n; ++i) order[i] = static_cast<int64_t>(i);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b] || (len[a] == len[b] && a < b); });
    return order;
}

Order order_of(const std::vector<int64_t>& len) {
    Order o;
    o.by_length = longest_first(len);
    o.sorted_len.resize(len.size());
    for (size_t j = 0; j < len.size(); ++j) o.sorted_len[j] = len[static_cast<size_t>(o.by_length[j])];
    return o;
}

Plan plan_with(const std::vector<int64_t>& len, const Order& ord, int64_t max_tokens, int64_t R, Balance balance) {
    const int64_t n = static_cast<int64_t>(len.size());
    if (n == 0) return Plan(static_cast<size_t>(R));
    int64_t total = 0;
    for (int64_t l : len) total += l;  // no overflow: checked at the boundary

    Work work;
    // fits(M, out, out_m): whether R * M bins fit; out_m = M when out now holds that partition, 0 when the
    // answer came from lpt_surely_fits without building one.
    auto fits = [&](int64_t M, Partition& out, int64_t& out_m) {
        out_m = 0;
        if (balance == Balance::kLPT && lpt_surely_fits(ord.sorted_len, R * M, max_tokens)) return true;
        const bool ok = partition(ord, R * M, balance, max_tokens, work, out);
        if (ok) out_m = M;
        return ok;
    };
    const int64_t bins_needed = total / max_tokens + (total % max_tokens != 0);
    const int64_t m_lo = std::max<int64_t>(1, bins_needed / R + (bins_needed % R != 0));
    const int64_t m_hi = (n + R - 1) / R;  // one sequence per bin at most: always fits
    Partition best, trial;
    int64_t best_m = 0, trial_m = 0;
    int64_t M = m_lo;
    if (!fits(m_lo, best, best_m)) {
        // Usually m_lo + 1 fits; galloping keeps adversarial inputs (every sequence just over half the
        // budget) at O(log N) partitions instead of O(N).
        int64_t lo = m_lo, hi = m_lo, step = 1;
        while (true) {
            hi = std::min(m_hi, lo + step);
            if (fits(hi, best, best_m)) break;
            lo = hi;
            step *= 2;
        }
        while (hi - lo > 1) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (fits(mid, trial, trial_m)) {
                hi = mid;
                std::swap(best, trial);  // trial's buffers are reused by the next step
                std::swap(best_m, trial_m);
            } else {
                lo = mid;
            }
        }
        M = hi;
    }

    // Heaviest bins first; ties by smallest sequence index, empty bins last.
    const int64_t S = R * M;
    std::vector<int64_t> order(static_cast<size_t>(S));
    for (int64_t b = 0; b < S; ++b) order[b] = b;
    if (best_m != M && !partition(ord, S, balance, max_tokens, work, best)) {
        throw std::logic_error("plan_microbatches: a bin count proven to fit did not");  // unreachable
    }
    finish(ord, best, work.scratch);
    const Bins bins = items_of(best);
    auto first = [&](int64_t b) { return bins.start[b] == bins.start[b + 1] ? n : bins.items[bins.start[b]]; };
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return best.load[a] > best.load[b] || (best.load[a] == best.load[b] && first(a) < first(b));
    });
    std::vector<int64_t> sorted_load(static_cast<size_t>(S));
    for (int64_t p = 0; p < S; ++p) sorted_load[p] = best.load[order[p]];

    std::vector<std::vector<int64_t>> rank_bins = assign_ranks(sorted_load, R, M, balance);
    Plan out(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t c = 0; c < M; ++c) {
            const int64_t b = order[rank_bins[r][c]];
            out[r].emplace_back(bins.items.begin() + bins.start[b], bins.items.begin() + bins.start[b + 1]);
        }
    }
    return out;
}

// True when plan a spreads token loads over ranks worse (larger max / min) than plan b.
bool worse_ranks(const Plan& a, const Plan& b, const std::vector<int64_t>& len) {
    auto extremes = [&](const Plan& p) {
        int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
        for (const auto& rank : p) {
            int64_t t = 0;
            for (const auto& mb : rank) {
                for (int64_t i : mb) t += len[i];
            }
            lo = std::min(lo, t), hi = std::max(hi, t);
        }
        return std::make_pair(hi, lo);
    };
    const auto [ha, la] = extremes(a);
    const auto [hb, lb] = extremes(b);
    return static_cast<__int128>(ha) * lb > static_cast<__int128>(hb) * la;
}

// Step 3 of the header: "kk" is never worse than "lpt" at balancing ranks.
Plan plan(const std::vector<int64_t>& len, int64_t max_tokens, int64_t R, Balance balance) {
    const Order ord = order_of(len);
    Plan p = plan_with(len, ord, max_tokens, R, balance);
    if (balance == Balance::kKK && R > 1) {
        Plan greedy = plan_with(len, ord, max_tokens, R, Balance::kLPT);
        if (worse_ranks(p, greedy, len)) return greedy;
    }
    return p;
}

py::array to_numpy(const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
    if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
    return a;
}

Balance parse_balance(py::handle obj) {
    if (py::isinstance<py::str>(obj)) {
        const std::string balance = obj.cast<std::string>();
        if (balance == "kk") return Balance::kKK;
        if (balance == "lpt") return Balance::kLPT;
    }
    throw py::value_error("balance must be 'kk' or 'lpt', got " + py::repr(obj).cast<std::string>());
}

// Lengths as int64, each >= 1, with an overflow-free total.
std::vector<int64_t> checked_lengths(py::handle obj, int64_t* longest_at) {
    Int64Array a = as_int64_1d("lengths", obj);
    std::vector<int64_t> len(a.data, a.data + a.size);
    int64_t total = 0;
    *longest_at = -1;
    for (int64_t i = 0; i < a.size; ++i) {
        if (len[i] < 1) {
            throw py::value_error("lengths must all be >= 1 (a sequence has at least one token), got lengths[" +
                                  std::to_string(i) + "] = " + std::to_string(len[i]));
        }
        if (len[i] > std::numeric_limits<int64_t>::max() - total) {
            throw py::value_error("lengths sum to more than int64 can hold (at lengths[" + std::to_string(i) + "])");
        }
        total += len[i];
        if (*longest_at < 0 || len[i] > len[*longest_at]) *longest_at = i;
    }
    return len;
}

// More ranks than any cluster has, and small enough that num_ranks * micro-batches can never overflow
// (with n <= 2^62 sequences, S = R * M <= n + R).
constexpr int64_t kMaxRanks = int64_t{1} << 20;

}  // namespace

void bind_plan(py::module_& m) {
    m.def(
        "plan_microbatches",
        [](py::handle lengths, py::handle max_tokens_obj, py::handle num_ranks_obj, py::handle balance) {
            const Balance bal = parse_balance(balance);
            const int64_t max_tokens = int_arg("max_tokens", max_tokens_obj, 1, std::numeric_limits<int64_t>::max());
            const int64_t num_ranks = int_arg("num_ranks", num_ranks_obj, 1, kMaxRanks);
            int64_t at = -1;
            std::vector<int64_t> len = checked_lengths(lengths, &at);
            if (at >= 0 && len[at] > max_tokens) {
                throw py::value_error("max_tokens = " + std::to_string(max_tokens) +
                                      " is smaller than the longest sequence (lengths[" + std::to_string(at) +
                                      "] = " + std::to_string(len[at]) +
                                      "): a sequence is never split across micro-batches");
            }
            Plan p;
            {
                py::gil_scoped_release nogil;
                p = plan(len, max_tokens, num_ranks, bal);
            }
            py::list out;
            for (const auto& rank : p) {
                py::list mbs;
                for (const auto& mb : rank) mbs.append(to_numpy(mb));
                out.append(mbs);
            }
            return out;
        },
        py::arg("lengths"), py::arg("max_tokens"), py::arg("num_ranks") = 1, py::arg("balance") = "kk",
        "Token-budget micro-batch plan: result[rank][k] = int64 sequence indices (see "
        "fusedrl.engine.packing.plan_microbatches).");

    m.def(
        "_partition",
        [](py::handle lengths, py::handle k_obj, py::handle balance) {
            const Balance bal = parse_balance(balance);
            int64_t at = -1;
            std::vector<int64_t> len = checked_lengths(lengths, &at);
            // k bins are k output arrays: bounded like the plan's num_ranks * M.
            const int64_t k = int_arg("k", k_obj, 1, std::max<int64_t>(kMaxRanks, static_cast<int64_t>(len.size())));
            Bins bins;
            {
                py::gil_scoped_release nogil;
                Work work;
                Partition p;
                const Order ord = order_of(len);
                partition(ord, k, bal, std::numeric_limits<int64_t>::max(), work, p);
                finish(ord, p, work.scratch);
                bins = items_of(p);
            }
            py::list out;
            for (int64_t b = 0; b < k; ++b) {
                out.append(to_numpy(std::vector<int64_t>(bins.items.begin() + bins.start[b], bins.items.begin() + bins.start[b + 1])));
            }
            return out;
        },
        py::arg("lengths"), py::arg("k"), py::arg("balance") = "kk",
        "Testing hook: the bin-level partition of `lengths` into k bins (list of k int64 index arrays).");
}

}  // namespace fusedrl
