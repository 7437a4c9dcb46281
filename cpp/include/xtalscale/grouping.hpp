/// @file grouping.hpp
/// @brief Reciprocal-space ASU mapping and grouping of observations into unique reflections.
///
/// The ASU conditions are gemmi's (CCP4 convention) in the reference setting; a space group in
/// another setting passes the change-of-basis matrix that takes its indices to the reference
/// setting. Results equal gemmi's ReciprocalAsu::to_asu index by index, including the MTZ
/// symmetry number ISYM (2k+1 for h R_k, 2k+2 for -h R_k).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "xtalscale/export.hpp"

namespace xtalscale {

/// The ten reciprocal ASU conditions of gemmi and cctbx (reference settings; 6/m and 6/mmm
/// share the 4/m and 4/mmm conditions, -3m has the -31m and -3m1 variants).
enum class AsuCondition : int {
  triclinic = 0,   ///< -1: l>0 or (l=0 and (h>0 or (h=0 and k>=0)))
  monoclinic = 1,  ///< 2/m: k>=0 and (l>0 or (l=0 and h>=0))
  orthorhombic = 2,  ///< mmm: h>=0 and k>=0 and l>=0
  tetragonal_low = 3,  ///< 4/m and 6/m: l>=0 and ((h>=0 and k>0) or (h=0 and k=0))
  tetragonal_high = 4,  ///< 4/mmm and 6/mmm: h>=k and k>=0 and l>=0
  trigonal_low = 5,  ///< -3: (h>=0 and k>0) or (h=0 and k=0 and l>=0)
  trigonal_312 = 6,  ///< -31m: h>=k and k>=0 and (k>0 or l>=0)
  trigonal_321 = 7,  ///< -3m1: h>=k and k>=0 and (h>k or l>=0)
  cubic_low = 8,  ///< m-3: h>=0 and ((l>=h and k>h) or (l=h and k=h))
  cubic_high = 9,  ///< m-3m: k>=l and l>=h and h>=0
};

/// gemmi's text of a condition (ReciprocalAsu::condition_str() in the reference setting), e.g.
/// "h>=0 and k>=0 and l>=0"; the Python layer maps gemmi's conditions to the enum with it.
XTALSCALE_EXPORT const char* asu_condition_text(AsuCondition condition) noexcept;

/// True if the index (already in the reference setting) lies in the ASU.
XTALSCALE_EXPORT bool in_asu(AsuCondition condition, std::int64_t h, std::int64_t k, std::int64_t l);

/// Symmetry data needed for ASU mapping.
struct AsuSymmetry {
  /// Integer rotation parts of the primitive operators (row-major 3x3), in gemmi's order.
  std::vector<std::array<int, 9>> rotations;
  /// Reference-setting transform: h_ref = h * basis (row vector times matrix). Entries may be
  /// scaled by any positive integer (the conditions are invariant under positive scaling).
  std::array<std::int64_t, 9> basis{1, 0, 0, 0, 1, 0, 0, 0, 1};
  AsuCondition condition = AsuCondition::triclinic;
};

/// Map @p n Miller indices (n x 3, row-major) to the ASU.
/// Writes the ASU index to @p asu_out (n x 3) and ISYM to @p isym_out (n).
/// Throws std::invalid_argument naming the row for (0,0,0) or an index with no ASU image.
/// Thread-safe (no shared state); @p hkl and the outputs must not overlap.
XTALSCALE_EXPORT void map_to_asu(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                std::int32_t* asu_out, std::int32_t* isym_out);

/// map_to_asu over up to @p n_threads threads (fixed row ranges; each row's result does not
/// depend on the split, so the outputs equal the serial call's). A failure names the first
/// bad row, as the serial call does.
XTALSCALE_EXPORT void map_to_asu(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                                 std::int32_t* asu_out, std::int32_t* isym_out, int n_threads);

/// Centric flags of n Miller indices (n × 3): out[i] = 1 when some rotation R of @p sym takes
/// h to its Friedel mate (h R = −h, the row-vector convention of map_to_asu, so a reflection is
/// centric exactly when map_to_asu maps h and −h to the same ASU index), else 0.
XTALSCALE_EXPORT void centric_flags(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                                    std::uint8_t* out);

/// centric_flags over up to @p n_threads threads (the same flags as the serial call).
XTALSCALE_EXPORT void centric_flags(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                                    std::uint8_t* out, int n_threads);

/// map_to_asu's ASU index of each row (to @p asu_out, n x 3) and, instead of ISYM, whether the
/// row is a Bijvoet-minus mate (to @p minus_out, n): an even ISYM (h maps to −h R) of an
/// acentric reflection (centric_flags of the ASU index is 0), the flags xtalscale.symmetry's
/// map_to_asu derives from ISYM and the centric test, in one pass. Rows split over up to
/// @p n_threads threads (the same outputs); failures as map_to_asu's.
XTALSCALE_EXPORT void map_to_asu_bijvoet(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                                         std::int32_t* asu_out, std::uint8_t* minus_out, int n_threads);

/// Group equal keys: a stable sort of @p keys (one counting sort when the key range is at most
/// twice the row count, else an LSD radix sort: O(n) and deterministic either way).
/// Writes the sort permutation to @p order (n), the 0-based group of every input position to
/// @p group_index (n) -- groups numbered in increasing key order -- and returns the group
/// start offsets into @p order, with n appended (size n_groups + 1).
/// Thread-safe; the outputs must not overlap @p keys.
XTALSCALE_EXPORT std::vector<std::int64_t> group_keys(const std::int64_t* keys, std::size_t n,
                                                      std::int64_t* order,
                                                      std::int64_t* group_index);

/// Stable order of @p n keys that are all in [0, n_keys) (e.g. group numbers): a counting
/// sort, O(n + n_keys), writing the permutation to @p order (n) and the start of each key's
/// run to @p offsets (n_keys + 1, the last = n). Equal to a stable argsort of the keys.
/// @throws std::invalid_argument naming the first key outside [0, n_keys).
XTALSCALE_EXPORT void counting_order(const std::int64_t* keys, std::size_t n, std::size_t n_keys,
                                     std::int64_t* order, std::int64_t* offsets);

/// Group equal Miller indices (n x 3, row-major), groups in lexicographic order of signed
/// (h, k, l) and rows within a group in input order (DIALS order). Same outputs as
/// group_keys. Throws std::invalid_argument if a component spans more than 2^21 values.
XTALSCALE_EXPORT std::vector<std::int64_t> group_miller_indices(const std::int32_t* hkl,
                                                                std::size_t n,
                                                                std::int64_t* order,
                                                                std::int64_t* group_index);

/// group_miller_indices with its counting sort (a key range at most about twice the row
/// count) over up to @p n_threads contiguous parts of the rows: each part counts its keys,
/// then places its rows after the earlier parts' rows of the same key, so the outputs are
/// the serial call's whatever the thread count. (The radix sort of wider ranges is serial.)
XTALSCALE_EXPORT std::vector<std::int64_t> group_miller_indices(const std::int32_t* hkl, std::size_t n,
                                                                std::int64_t* order, std::int64_t* group_index,
                                                                int n_threads);

/// Split a grouping by Miller index into Bijvoet halves: what group_miller_indices gives
/// for the same indices with the rows flagged in @p minus negated, without sorting again.
/// The input is group_miller_indices' (@p order, @p offsets of @p n_groups groups whose
/// indices are @p keys, n_groups x 3, in its order). A group's unflagged rows keep its key,
/// its flagged rows form the group of the negated key; the negated keys are in the reverse
/// of the groups' order (negation reverses lexicographic order), so one merge of the two
/// runs orders all groups, and rows stay in input order within each group. Returns the new
/// offsets and writes the new order to @p out_order (as many entries as @p order).
XTALSCALE_EXPORT std::vector<std::int64_t> split_bijvoet_groups(const std::int64_t* order,
                                                                const std::int64_t* offsets,
                                                                std::size_t n_groups,
                                                                const std::int32_t* keys,
                                                                const std::uint8_t* minus,
                                                                std::int64_t* out_order);

}  // namespace xtalscale
