//! A deterministic mutator: the same seed gives the same cases, so a failure in CI can be run
//! again with the seed and the case number it prints.

/// xorshift64*: small, fast, and enough to spread mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Pieces that mean something to the parsers: YAML and JSON structure, anchors and aliases,
/// tags, numbers at the edges, odd whitespace.
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"{",
    b"}",
    b": ",
    b", ",
    b"\n",
    b"\n  ",
    b"- ",
    b"'",
    b"\"",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!binary ",
    b"!!str ",
    b"~",
    b"null",
    b"---\n",
    b"...\n",
    b"#",
    b"\t",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\x00",
    b"1e999",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"0x",
    b"kind: ",
    b"name: ",
    b"spec: ",
    b"routes: ",
    b"upstream: ",
    b"split: ",
    b"regex: ",
    b"domains: ",
    b"hosts: ",
    b"weight: ",
    b"port: 65536",
    b"\\u0000",
    b"\\ud800",
];

/// The largest input a mutation may grow to.
pub const MAX_LEN: usize = 64 * 1024;

/// One case: `seeds[..]` picked and changed by 1 to 4 mutations (more, and most texts stop
/// being YAML at the first line).
pub fn case(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds
        .get(rng.below(seeds.len()))
        .cloned()
        .unwrap_or_default();
    for _ in 0..=rng.below(4) {
        mutate(rng, &mut data, seeds);
    }
    data.truncate(MAX_LEN);
    data
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(9) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Set a byte.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        // Insert a meaningful token.
        2 => {
            let token = TOKENS[rng.below(TOKENS.len())];
            let at = rng.below(len + 1);
            data.splice(at..at, token.iter().copied());
        }
        // Delete a range.
        3 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            data.drain(at..at + n);
        }
        // Repeat a range (deep nesting, long lists, big scalars).
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(32));
            let piece: Vec<u8> = data[at..at + n].to_vec();
            let times = 1 + rng.below(256);
            let insert: Vec<u8> = piece.iter().copied().cycle().take(n * times).collect();
            data.splice(at..at, insert);
        }
        // Splice in part of another seed.
        5 if !seeds.is_empty() => {
            let other = &seeds[rng.below(seeds.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(256));
                let at = rng.below(len + 1);
                data.splice(at..at, other[from..from + n].iter().copied());
            }
        }
        // Truncate.
        6 if len > 0 => data.truncate(rng.below(len)),
        // Nest: wrap a range in brackets many times.
        7 => {
            let depth = 1 + rng.below(100);
            let (open, close): (&[u8], &[u8]) = if rng.below(2) == 0 {
                (b"[", b"]")
            } else {
                (b"{a: ", b"}")
            };
            let at = rng.below(len + 1);
            let mut insert = open.repeat(depth);
            insert.extend(close.repeat(depth));
            data.splice(at..at, insert);
        }
        // Random bytes.
        _ => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_cases() {
        let seeds = vec![b"kind: Upstream\nname: a\n".to_vec()];
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = case(&mut a, &seeds);
            assert_eq!(x, case(&mut b, &seeds));
            assert!(x.len() <= MAX_LEN);
        }
    }
}
