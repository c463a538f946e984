//! Seeded byte mutations of valid files.

use rand::Rng;
use rand_pcg::Pcg64;

/// Integers that break size arithmetic: zero, one, sign and width boundaries.
pub const INTERESTING: [u64; 22] = [
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    127,
    128,
    255,
    256,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// Decimal (and float) spellings that break parsers and the arithmetic behind them.
pub const INTERESTING_TEXT: [&str; 20] = [
    "0",
    "1",
    "-1",
    "2",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e999",
    "-0",
    "0.5",
    "nan",
    "inf",
    "-inf",
    "1000000",
    "4611686018427387904",
];

/// One interesting integer, or one near a random value.
fn interesting(rng: &mut Pcg64) -> u64 {
    match rng.random_range(0..3) {
        0 => INTERESTING[rng.random_range(0..INTERESTING.len())],
        1 => INTERESTING[rng.random_range(0..INTERESTING.len())].wrapping_add_signed(rng.random_range(-4..=4)),
        _ => rng.random::<u64>() >> rng.random_range(0..64),
    }
}

/// Writes `value` at `at` as a `width`-byte integer (little or big endian), clipped to `data`.
pub fn write_int(data: &mut [u8], at: usize, width: usize, value: u64, big_endian: bool) {
    let bytes = if big_endian { value.to_be_bytes() } else { value.to_le_bytes() };
    let word = if big_endian { &bytes[8 - width..] } else { &bytes[..width] };
    for (i, b) in word.iter().enumerate() {
        if let Some(slot) = data.get_mut(at + i) {
            *slot = *b;
        }
    }
}

/// Runs of ASCII digits (with an optional leading '-'), as `(start, end)`.
fn number_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i].is_ascii_digit() {
            let start = if i > 0 && data[i - 1] == b'-' { i - 1 } else { i };
            let mut end = i;
            while end < data.len() && (data[end].is_ascii_digit() || data[end] == b'.' || data[end] == b'e') {
                end += 1;
            }
            runs.push((start, end));
            i = end;
        } else {
            i += 1;
        }
    }
    runs
}

/// Mutation knobs of a target: which offsets hold header integers, and how they are stored.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    /// Offsets of integer fields near the start (length fields, magic, sizes): int edits land on
    /// one of them half the time.
    pub header_fields: &'static [(usize, usize)],
    pub big_endian: bool,
    /// Text formats (TOML, JSON headers): number and line edits are favoured.
    pub text: bool,
}

/// Applies 1 to 8 stacked mutations (fewer more often) to `data`, drawing splices from `corpus`.
pub fn mutate(data: &mut Vec<u8>, corpus: &[Vec<u8>], shape: Shape, rng: &mut Pcg64) {
    let count = 1 + (rng.random::<u32>().trailing_zeros() as usize).min(7);
    for _ in 0..count {
        mutate_once(data, corpus, shape, rng);
    }
}

fn mutate_once(data: &mut Vec<u8>, corpus: &[Vec<u8>], shape: Shape, rng: &mut Pcg64) {
    let len = data.len();
    let pos = |rng: &mut Pcg64, n: usize| if n == 0 { 0 } else { rng.random_range(0..n) };
    let kinds = if shape.text { 12 } else { 10 };
    match rng.random_range(0..kinds) {
        0 if len > 0 => {
            let at = pos(rng, len);
            data[at] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let at = pos(rng, len);
            data[at] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'{', b'[', b'\n'][rng.random_range(0..10)];
        }
        2 if len > 0 => {
            let at = pos(rng, len);
            data[at] = rng.random();
        }
        3 => {
            let at = pos(rng, len + 1);
            let n = rng.random_range(1..=32);
            let fill: Vec<u8> = if rng.random_bool(0.5) { (0..n).map(|_| rng.random()).collect() } else { vec![rng.random(); n] };
            data.splice(at..at, fill);
        }
        4 if len > 0 => {
            let at = pos(rng, len);
            let n = rng.random_range(1..=(len - at).min(64));
            data.drain(at..at + n);
        }
        5 => data.truncate(pos(rng, len)),
        6 if !corpus.is_empty() => {
            // Splice: this input's head, another seed's tail.
            let other = &corpus[rng.random_range(0..corpus.len())];
            let cut = pos(rng, len + 1);
            let from = pos(rng, other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        7 | 8 => {
            let (at, width) = match shape.header_fields {
                fields if !fields.is_empty() && rng.random_bool(0.5) => fields[rng.random_range(0..fields.len())],
                _ => (pos(rng, len), [1, 2, 4, 8][rng.random_range(0..4)]),
            };
            let big = if rng.random_bool(0.8) { shape.big_endian } else { !shape.big_endian };
            write_int(data, at, width, interesting(rng), big);
        }
        9 if len > 1 => {
            // Duplicate a chunk elsewhere (repeated entries, nested structures).
            let start = pos(rng, len);
            let n = rng.random_range(1..=(len - start).min(256));
            let chunk = data[start..start + n].to_vec();
            let at = pos(rng, len + 1);
            data.splice(at..at, chunk);
        }
        10 | 11 => {
            let runs = number_runs(data);
            if runs.is_empty() {
                return;
            }
            let (start, end) = runs[rng.random_range(0..runs.len())];
            let text = if rng.random_bool(0.7) {
                INTERESTING_TEXT[rng.random_range(0..INTERESTING_TEXT.len())].to_string()
            } else {
                interesting(rng).to_string()
            };
            data.splice(start..end, text.into_bytes());
        }
        _ => {
            if len > 0 {
                let at = pos(rng, len);
                data[at] = data[at].wrapping_add(rng.random_range(1..=3));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mutations_are_a_function_of_the_seed() {
        let corpus = vec![b"{\"a\": 12, \"b\": [3, 4]}".to_vec(), vec![1, 2, 3, 4, 5, 6, 7, 8]];
        let run = |seed| {
            let mut data = corpus[0].clone();
            mutate(&mut data, &corpus, Shape { text: true, ..Default::default() }, &mut Pcg64::seed_from_u64(seed));
            data
        };
        assert_eq!(run(7), run(7));
        assert!((0..50).map(run).any(|d| d != corpus[0]));
        let mut word = vec![0u8; 6];
        write_int(&mut word, 1, 4, 0x0102_0304, true);
        assert_eq!(word, [0, 1, 2, 3, 4, 0]);
        write_int(&mut word, 4, 4, 0x0a0b_0c0d, false);
        assert_eq!(word, [0, 1, 2, 3, 0x0d, 0x0c], "clipped at the end");
    }
}
