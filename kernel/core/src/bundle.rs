//! The boot bundle: what reaches the kernel in the bootloader's ramdisk.
//!
//! A plain ustar archive (POSIX.1-1988), so the host side builds it with
//! the `tar` crate or `tar` itself and the same route carries a later real
//! guest image: guest programs (`guest/<name>.elf`) and the boot options
//! (`options`). This module only reads it; nothing here trusts the archive.

const BLOCK: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleError {
    /// A header is not ustar, or its checksum does not match.
    BadHeader { offset: usize },
    /// A size field that is not octal, or a file running past the end.
    Truncated { offset: usize },
}

impl core::fmt::Display for BundleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BundleError::BadHeader { offset } => write!(f, "bad ustar header at byte {offset}"),
            BundleError::Truncated { offset } => write!(f, "archive truncated at byte {offset}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
}

/// A validated archive: every regular file, in order.
pub struct Bundle<'a> {
    bytes: &'a [u8],
}

impl<'a> Bundle<'a> {
    /// Checks every header once; afterwards iteration cannot fail.
    pub fn parse(bytes: &'a [u8]) -> Result<Bundle<'a>, BundleError> {
        let mut off = 0;
        while let Some(h) = next_header(bytes, off)? {
            off = h.next;
        }
        Ok(Bundle { bytes })
    }

    pub fn entries(&self) -> impl Iterator<Item = Entry<'a>> + '_ {
        let bytes = self.bytes;
        let mut off = 0;
        core::iter::from_fn(move || loop {
            let h = next_header(bytes, off).ok()??;
            off = h.next;
            if h.regular {
                return Some(Entry { name: h.name, data: &bytes[h.data..h.data + h.size] });
            }
        })
    }

    pub fn file(&self, name: &str) -> Option<&'a [u8]> {
        self.entries().find(|e| e.name == name).map(|e| e.data)
    }
}

struct Header<'a> {
    name: &'a str,
    regular: bool,
    data: usize,
    size: usize,
    next: usize,
}

/// Reads the header at `off`; `None` at the end-of-archive zero block or
/// at the end of the bytes.
fn next_header(bytes: &[u8], off: usize) -> Result<Option<Header<'_>>, BundleError> {
    let Some(h) = bytes.get(off..off + BLOCK) else {
        return Ok(None);
    };
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let bad = BundleError::BadHeader { offset: off };
    if &h[257..262] != b"ustar" {
        return Err(bad);
    }
    // The checksum counts the checksum field itself as eight spaces.
    let sum: u32 = h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u32 }).sum();
    if octal(&h[148..156]) != Some(sum as usize) {
        return Err(bad);
    }
    let size = octal(&h[124..136]).ok_or(BundleError::Truncated { offset: off })?;
    let name = core::str::from_utf8(until_nul(&h[0..100])).map_err(|_| bad)?;
    let data = off + BLOCK;
    if data.checked_add(size).is_none_or(|end| end > bytes.len()) {
        return Err(BundleError::Truncated { offset: off });
    }
    let regular = matches!(h[156], b'0' | 0);
    Ok(Some(Header { name, regular, data, size, next: data + size.div_ceil(BLOCK) * BLOCK }))
}

fn until_nul(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// An octal field: digits, padded with spaces or NULs.
fn octal(field: &[u8]) -> Option<usize> {
    let s = core::str::from_utf8(until_nul(field)).ok()?.trim();
    usize::from_str_radix(s, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn reads_what_the_tar_crate_writes() {
        let big = vec![0x5a; 1500];
        let bytes = archive(&[("options", b"log=debug\n"), ("guest/a.elf", &big), ("empty", b"")]);
        let b = Bundle::parse(&bytes).unwrap();
        let names: Vec<_> = b.entries().map(|e| e.name).collect();
        assert_eq!(names, ["options", "guest/a.elf", "empty"]);
        assert_eq!(b.file("options"), Some(&b"log=debug\n"[..]));
        assert_eq!(b.file("guest/a.elf"), Some(&big[..]));
        assert_eq!(b.file("empty"), Some(&b""[..]));
        assert_eq!(b.file("missing"), None);
    }

    #[test]
    fn an_empty_ramdisk_is_an_empty_bundle() {
        assert_eq!(Bundle::parse(&[]).unwrap().entries().count(), 0);
    }

    #[test]
    fn corruption_is_reported_not_followed() {
        let good = archive(&[("options", b"x=1")]);
        let mut bad_sum = good.clone();
        bad_sum[0] ^= 1; // the name changes, the checksum no longer matches
        assert_eq!(Bundle::parse(&bad_sum).err(), Some(BundleError::BadHeader { offset: 0 }));

        let mut not_tar = good.clone();
        not_tar[257] = b'X';
        assert!(matches!(Bundle::parse(&not_tar), Err(BundleError::BadHeader { .. })));

        // A header whose size runs past the end of the ramdisk.
        let two = archive(&[("a", &[1; 600])]);
        assert_eq!(Bundle::parse(&two[..BLOCK + 100]).err(), Some(BundleError::Truncated { offset: 0 }));
        // Cut right after the data, before the padding: still whole.
        assert_eq!(Bundle::parse(&good[..BLOCK + 3]).unwrap().file("options"), Some(&b"x=1"[..]));
    }
}
