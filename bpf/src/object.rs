//! The compiled BPF object, embedded so that building the crate needs no clang.
//!
//! `src/bpf/sluice.bpf.o` is built from `src/bpf/sluice.bpf.c` by `build-bpf.sh` and committed;
//! `check-object.sh` fails when it is stale.

/// ELF parsing reads headers in place, so the bytes must be aligned like the structs in them.
#[repr(C, align(8))]
struct Aligned<B: ?Sized> {
    bytes: B,
}

static OBJECT: &Aligned<[u8]> = &Aligned { bytes: *include_bytes!("bpf/sluice.bpf.o") };

pub(crate) fn bytes() -> &'static [u8] {
    &OBJECT.bytes
}

#[cfg(test)]
mod tests {
    #[test]
    fn object_is_an_aligned_bpf_elf() {
        let b = super::bytes();
        assert_eq!(b.as_ptr() as usize % 8, 0);
        assert_eq!(&b[..4], b"\x7fELF");
        // e_machine (offset 18, little endian) is EM_BPF = 247.
        assert_eq!(u16::from_le_bytes([b[18], b[19]]), 247);
    }
}
