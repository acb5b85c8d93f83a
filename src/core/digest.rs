//! Block digests for online verify and checksum-based resync: XXH64 (seed 0) of each bitmap
//! block.
//!
//! Why not crc32: 32 bits per 4 KiB block gives a 1 in 4 billion chance per differing block of
//! a false "same", and a resync decision made on it is silent data loss. Two crc32s with
//! different seeds do not help (CRC is linear: their xor depends only on the length). XXH64 is a
//! well-specified, non-linear 64-bit hash, fast in plain Rust (several GB/s per core, well
//! above disk speed), written here to avoid a dependency; the tests pin it to the reference
//! vectors.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a) as u64
}

/// XXH64 of `data` with `seed`.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        let mut stripes = rest.chunks_exact(32);
        for s in &mut stripes {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = round(*acc, le64(&s[i * 8..]));
            }
        }
        rest = stripes.remainder();
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for acc in v {
            h = merge(h, acc);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        h ^= round(0, le64(w));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    rest = words.remainder();
    if rest.len() >= 4 {
        h ^= le32(rest).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= (b as u64).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    h
}

/// The digest of one block.
pub fn block(data: &[u8]) -> u64 {
    xxh64(data, 0)
}

/// The digests of `data` cut into `block_size`-byte blocks (the last may be shorter).
pub fn blocks(data: &[u8], block_size: u64) -> Vec<u64> {
    let bs = usize::try_from(block_size.max(1)).unwrap_or(usize::MAX);
    data.chunks(bs).map(block).collect()
}

/// Compares local digests with the peer's for blocks starting at block `first`: the runs
/// `(first block, blocks)` that differ. A block only one side has a digest for differs.
pub fn differing_runs(first: u64, mine: &[u64], theirs: &[u64]) -> Vec<(u64, u64)> {
    let n = mine.len().max(theirs.len());
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..n {
        if mine.get(i).is_some() && mine.get(i) == theirs.get(i) {
            continue;
        }
        let b = first + i as u64;
        match runs.last_mut() {
            Some((f, len)) if *f + *len == b => *len += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from the xxHash project (XXH64, seed 0 unless stated).
    #[test]
    fn matches_reference_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn one_flipped_bit_changes_the_digest() {
        let mut a = vec![0u8; 4096];
        let d0 = block(&a);
        for bit in [0usize, 7, 4095 * 8, 2048 * 8 + 3] {
            a[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(block(&a), d0, "bit {bit}");
            a[bit / 8] ^= 1 << (bit % 8);
        }
        assert_eq!(block(&a), d0);
    }

    #[test]
    fn runs_of_differing_blocks() {
        let mine = [1, 2, 3, 4, 5];
        let theirs = [1, 9, 9, 4, 9];
        assert_eq!(differing_runs(10, &mine, &theirs), vec![(11, 2), (14, 1)]);
        assert_eq!(differing_runs(0, &mine, &mine), vec![]);
        // Missing digests on either side count as differing.
        assert_eq!(differing_runs(0, &[1, 2], &[1]), vec![(1, 1)]);
        assert_eq!(differing_runs(0, &[1], &[1, 2]), vec![(1, 1)]);
        assert_eq!(blocks(&[0u8; 10000], 4096).len(), 3);
    }
}
