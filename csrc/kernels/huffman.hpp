// Canonical Huffman coding of uint8 symbol streams (the index streams of
// weight sharing; ALGORITHMS.md 1.5).
//
// Code lengths come from the two-queue Huffman construction with a fixed
// tie-break (leaves sorted by (count, symbol); on equal weights a leaf is taken
// before a merged node), so the numpy reference builds the same code bit for
// bit. Codes are canonical (DEFLATE's assignment: by length, then symbol), so
// the 256 code lengths are the whole table. Bits are packed MSB first; the last
// byte is padded with zeros. A stream with one distinct symbol gets a 1-bit code.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

namespace pycompress {

// Longest code accepted: codes plus up to 7 pending bits fit in 64 bits.
// Reaching it needs Fibonacci-like counts, i.e. more than 10^12 symbols.
constexpr int kMaxHuffmanLength = 57;

using CodeLengths = std::array<uint8_t, 256>;

// counts: occurrences of each byte value. Throws if a code would exceed kMaxHuffmanLength.
CodeLengths huffman_code_lengths(const std::array<uint64_t, 256>& counts);

// Encode with the given lengths (every symbol present must have a length > 0).
std::vector<uint8_t> huffman_encode(const uint8_t* symbols, int64_t n, const CodeLengths& lengths);

// Decode exactly `count` symbols. Throws std::invalid_argument on lengths that
// do not form a prefix code, on a bit pattern that is no codeword, and on a
// payload that ends early (all reads are bounds-checked: corrupted input never
// reads out of range).
std::vector<uint8_t> huffman_decode(const uint8_t* payload, int64_t nbytes, const CodeLengths& lengths,
                                    int64_t count);

}  // namespace pycompress
