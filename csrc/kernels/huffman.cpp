#include "huffman.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pycompress {

CodeLengths huffman_code_lengths(const std::array<uint64_t, 256>& counts) {
    CodeLengths lengths{};
    std::vector<int> leaves;
    for (int s = 0; s < 256; ++s)
        if (counts[s] > 0) leaves.push_back(s);
    if (leaves.empty()) return lengths;
    if (leaves.size() == 1) {
        lengths[leaves[0]] = 1;
        return lengths;
    }
    std::stable_sort(leaves.begin(), leaves.end(), [&](int a, int b) { return counts[a] < counts[b]; });
    // Nodes 0..m-1 are the leaves in queue order, m.. the merged nodes in
    // creation order (which is also ascending weight: the two-queue method).
    const size_t m = leaves.size();
    std::vector<uint64_t> weight(2 * m - 1);
    std::vector<int64_t> parent(2 * m - 1, -1);
    for (size_t i = 0; i < m; ++i) weight[i] = counts[leaves[i]];
    size_t next_leaf = 0, next_merged = m, created = m;
    auto take = [&]() -> size_t {
        const bool leaf = next_leaf < m && (next_merged == created || weight[next_leaf] <= weight[next_merged]);
        return leaf ? next_leaf++ : next_merged++;
    };
    while (created < 2 * m - 1) {
        const size_t a = take(), b = take();
        weight[created] = weight[a] + weight[b];
        parent[a] = parent[b] = static_cast<int64_t>(created);
        ++created;
    }
    // Depth of each node: parents are created after their children, so one
    // pass from the root down fills every depth.
    std::vector<int> depth(2 * m - 1, 0);
    for (size_t i = 2 * m - 1; i-- > 0;)
        if (parent[i] >= 0) depth[i] = depth[parent[i]] + 1;
    for (size_t i = 0; i < m; ++i) {
        if (depth[i] > kMaxHuffmanLength)
            throw std::invalid_argument("huffman: code longer than " + std::to_string(kMaxHuffmanLength) + " bits");
        lengths[leaves[i]] = static_cast<uint8_t>(depth[i]);
    }
    return lengths;
}

namespace {

struct Canonical {
    int max_length = 0;
    std::array<int64_t, kMaxHuffmanLength + 2> count{};  // codes of each length
    std::vector<int> symbols;                           // sorted by (length, symbol)
    std::array<uint64_t, 256> code{};                   // codeword of each symbol
};

Canonical canonical(const CodeLengths& lengths) {
    Canonical c;
    for (int s = 0; s < 256; ++s) {
        const int len = lengths[s];
        if (len > kMaxHuffmanLength)
            throw std::invalid_argument("huffman: code length " + std::to_string(len) + " exceeds " +
                                        std::to_string(kMaxHuffmanLength));
        if (len > 0) {
            ++c.count[len];
            c.max_length = std::max(c.max_length, len);
        }
    }
    // Kraft: sum 2^-len <= 1, else the lengths are no prefix code (corrupted table).
    uint64_t room = 1;  // codewords still free at the current length
    for (int len = 1; len <= c.max_length; ++len) {
        room <<= 1;
        if (static_cast<uint64_t>(c.count[len]) > room)
            throw std::invalid_argument("huffman: code lengths over-subscribe the code space");
        room -= static_cast<uint64_t>(c.count[len]);
    }
    for (int len = 1; len <= c.max_length; ++len)
        for (int s = 0; s < 256; ++s)
            if (lengths[s] == len) c.symbols.push_back(s);
    uint64_t next = 0;
    int len = 0;
    for (int s : c.symbols) {
        while (len < lengths[s]) {
            next <<= 1;
            ++len;
        }
        c.code[s] = next++;
    }
    return c;
}

}  // namespace

std::vector<uint8_t> huffman_encode(const uint8_t* symbols, int64_t n, const CodeLengths& lengths) {
    const Canonical c = canonical(lengths);
    uint64_t total_bits = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (lengths[symbols[i]] == 0)
            throw std::invalid_argument("huffman: symbol " + std::to_string(symbols[i]) + " has no code");
        total_bits += lengths[symbols[i]];
    }
    std::vector<uint8_t> out(static_cast<size_t>((total_bits + 7) / 8), 0);
    uint64_t acc = 0;  // pending bits, right-aligned
    int pending = 0;
    size_t pos = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int len = lengths[symbols[i]];
        acc = (acc << len) | c.code[symbols[i]];
        pending += len;
        while (pending >= 8) {
            pending -= 8;
            out[pos++] = static_cast<uint8_t>(acc >> pending);
        }
        acc &= (uint64_t{1} << pending) - 1;
    }
    if (pending > 0) out[pos++] = static_cast<uint8_t>(acc << (8 - pending));
    return out;
}

std::vector<uint8_t> huffman_decode(const uint8_t* payload, int64_t nbytes, const CodeLengths& lengths,
                                    int64_t count) {
    if (count < 0 || nbytes < 0) throw std::invalid_argument("huffman: negative size");
    const Canonical c = canonical(lengths);
    if (count > 0 && c.symbols.empty()) throw std::invalid_argument("huffman: empty code table");
    // Every code is at least 1 bit: a count the payload cannot hold is corrupt
    // (checked before allocating, so a forged count cannot exhaust memory).
    if (count > nbytes * 8) throw std::invalid_argument("huffman: payload truncated");
    std::vector<uint8_t> out(static_cast<size_t>(count));
    const uint64_t total_bits = static_cast<uint64_t>(nbytes) * 8;
    uint64_t bit = 0;
    for (int64_t i = 0; i < count; ++i) {
        // Canonical decoding one bit at a time (as in zlib's puff.c): codes of
        // length len are the integers first .. first + count[len] - 1.
        uint64_t code = 0, first = 0;
        int64_t index = 0;
        int len = 1;
        for (;; ++len) {
            if (len > c.max_length) throw std::invalid_argument("huffman: invalid codeword in payload");
            if (bit >= total_bits) throw std::invalid_argument("huffman: payload truncated");
            code |= (payload[bit >> 3] >> (7 - (bit & 7))) & 1u;
            ++bit;
            const uint64_t n_len = static_cast<uint64_t>(c.count[len]);
            if (code - first < n_len) {
                out[i] = static_cast<uint8_t>(c.symbols[index + static_cast<int64_t>(code - first)]);
                break;
            }
            index += c.count[len];
            first = (first + n_len) << 1;
            code <<= 1;
        }
    }
    return out;
}

}  // namespace pycompress
