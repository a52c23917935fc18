//! A mutational fuzz driver for stable Rust, for machines without a nightly
//! toolchain (cargo-fuzz needs one). Blind (no coverage feedback), so weaker
//! than libFuzzer: it mutates the seed inputs and every input that was new in
//! length, and runs each through the target, catching panics.
//!
//! `stable-driver TARGET SECONDS [DIR...]`: seeds from the DIRs; a failing input
//! is written to `artifacts/TARGET/crash-<hash>` and the driver exits 1.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// xorshift64*: enough randomness for mutations, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'\'', b'|', b'[', b']', b'=', b'.', b'/', b'\n'];

fn mutate(rng: &mut Rng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(out.len() + 1);
                out.insert(i, rng.next() as u8);
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = rng.below(out.len() - i + 1).min(16);
                out.drain(i..i + n);
            }
            4 if !out.is_empty() => {
                let n = rng.below(out.len() + 1);
                out.truncate(n);
            }
            5 if !pool.is_empty() => {
                // Splice a piece of another input in.
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a).min(64);
                    let at = rng.below(out.len() + 1);
                    out.splice(at..at, other[a..b].iter().copied());
                }
            }
            _ if out.len() >= 2 => {
                // Duplicate a block (lengths, repeated headers).
                let a = rng.below(out.len());
                let b = (a + 1 + rng.below(32)).min(out.len());
                let block = out[a..b].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, block);
            }
            _ => out.push(rng.next() as u8),
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: stable-driver TARGET SECONDS [SEED_DIR...]";
    let (Some(name), Some(seconds)) = (args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let Some(&(_, target)) = octo_fuzz::TARGETS.iter().find(|(n, _)| n == name) else {
        eprintln!("unknown target {name}; targets: {:?}", octo_fuzz::TARGETS.iter().map(|t| t.0).collect::<Vec<_>>());
        std::process::exit(2);
    };
    let seconds: u64 = seconds.parse().unwrap_or_else(|_| {
        eprintln!("{usage}");
        std::process::exit(2)
    });
    let mut pool: Vec<Vec<u8>> = vec![Vec::new()];
    for dir in &args[3..] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Ok(data) = std::fs::read(e.path()) {
                    pool.push(data);
                }
            }
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut rng = Rng(seed);
    let mut seen_lengths = std::collections::HashSet::new();
    std::panic::set_hook(Box::new(|_| {}));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs: u64 = 0;
    while Instant::now() < deadline {
        let base = pool[rng.below(pool.len())].clone();
        let input = if runs < pool.len() as u64 {
            pool[runs as usize].clone()
        } else {
            mutate(&mut rng, &base, &pool)
        };
        let result = std::panic::catch_unwind(|| target(&input));
        runs += 1;
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let mut h = DefaultHasher::new();
            input.hash(&mut h);
            let dir = PathBuf::from("artifacts").join(name);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{:016x}", h.finish()));
            let _ = std::fs::write(&path, &input);
            eprintln!("FAILED after {runs} runs: {message}\ninput: {}", path.display());
            std::process::exit(1);
        }
        if input.len() < 1 << 20 && seen_lengths.insert(input.len()) && pool.len() < 10_000 {
            pool.push(input);
        }
    }
    eprintln!("ran {runs} inputs for {seconds} s against {name}: no failure");
}
