//! A bound on the parameter memory a config may ask for, checked before anything is allocated:
//! a header or a typo (`embed_dim = 1000000`) is an error naming the bytes, not an allocation
//! abort. The bound is the machine's physical memory (`MemTotal` of /proc/meminfo; 64 GiB where
//! that cannot be read): `copies` f32 copies of the parameters must fit in it.

/// Bytes of physical memory.
pub fn physical_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(64 << 30)
}

/// Why `copies` f32 copies of `params` parameters do not fit in physical memory (`None`: they
/// fit). `copies` names what they are, e.g. "weights, gradients and 2 AdamW moments".
pub fn params_too_big(params: usize, copies: u64, of_what: &str) -> Option<String> {
    let need = params as u128 * 4 * copies as u128;
    let have = physical_bytes();
    (need > have as u128).then(|| {
        format!(
            "{params} parameters need {need} bytes ({:.1} GiB: {copies} f32 copies, {of_what}), more than the {have} bytes ({:.1} GiB) of this machine's memory",
            need as f64 / (1u64 << 30) as f64,
            have as f64 / (1u64 << 30) as f64
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_physical_memory() {
        let have = physical_bytes();
        assert!(have > 1 << 28, "{have}");
        assert_eq!(params_too_big(1000, 4, "x"), None);
        let err = params_too_big((have / 4) as usize, 2, "weights and gradients").unwrap();
        assert!(err.contains("bytes") && err.contains("weights and gradients"), "{err}");
    }
}
