//! The zip container of a `torch.save` file, read straight from its bytes.
//!
//! PyTorch writes every entry uncompressed ("stored"), so an entry's data is
//! a plain byte range of the file and no decompressor is needed. Only the
//! central directory (zip64 included, for files past 4 GiB) and the local
//! headers it points to are read, each with its bounds checked against the
//! file; nothing here allocates more than the directory's own size.

use std::collections::HashMap;

/// At most this many entries are listed (a checkpoint has one per storage).
pub const MAX_ENTRIES: usize = 1 << 20;

const EOCD: u32 = 0x0605_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const EOCD64: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

/// One entry of the central directory.
#[derive(Debug, Clone)]
struct Entry {
    method: u16,
    compressed: u64,
    size: u64,
    local_header: u64,
}

/// A zip archive's directory over its bytes.
pub struct Archive<'a> {
    bytes: &'a [u8],
    entries: HashMap<String, Entry>,
    /// Names in directory order.
    names: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl<'a> Archive<'a> {
    /// Reads the directory of the archive `bytes`.
    pub fn read(bytes: &'a [u8]) -> Result<Self, String> {
        let truncated = || "the zip directory is truncated or corrupt".to_string();
        let eocd = find_eocd(bytes)
            .ok_or_else(|| "no zip end-of-directory record (truncated download?)".to_string())?;
        let mut count = u16_at(bytes, eocd + 10).ok_or_else(truncated)? as u64;
        let mut cd_size = u32_at(bytes, eocd + 12).ok_or_else(truncated)? as u64;
        let mut cd_offset = u32_at(bytes, eocd + 16).ok_or_else(truncated)? as u64;
        if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            let locator = eocd.checked_sub(20).ok_or_else(truncated)?;
            if u32_at(bytes, locator) != Some(EOCD64_LOCATOR) {
                return Err("zip64 archive without its zip64 directory locator".into());
            }
            let record = to_usize(u64_at(bytes, locator + 8).ok_or_else(truncated)?)
                .filter(|&r| r < locator)
                .ok_or_else(truncated)?;
            if u32_at(bytes, record) != Some(EOCD64) {
                return Err("zip64 directory locator points to no zip64 directory".into());
            }
            count = u64_at(bytes, record + 32).ok_or_else(truncated)?;
            cd_size = u64_at(bytes, record + 40).ok_or_else(truncated)?;
            cd_offset = u64_at(bytes, record + 48).ok_or_else(truncated)?;
        }
        let start = to_usize(cd_offset).ok_or_else(truncated)?;
        let end = to_usize(cd_size)
            .and_then(|s| start.checked_add(s))
            .filter(|&e| e <= eocd)
            .ok_or_else(truncated)?;
        if count > MAX_ENTRIES as u64 || count > (end - start) as u64 / 46 {
            return Err(format!(
                "the zip directory claims {count} entries, more than it can hold"
            ));
        }
        let mut entries = HashMap::new();
        let mut names = Vec::new();
        let mut at = start;
        for _ in 0..count {
            if u32_at(bytes, at) != Some(CENTRAL) || at + 46 > end {
                return Err(truncated());
            }
            let field = |off: usize| u32_at(bytes, at + off).map(u64::from);
            let method = u16_at(bytes, at + 10).ok_or_else(truncated)?;
            let mut compressed = field(20).ok_or_else(truncated)?;
            let mut size = field(24).ok_or_else(truncated)?;
            let name_len = u16_at(bytes, at + 28).ok_or_else(truncated)? as usize;
            let extra_len = u16_at(bytes, at + 30).ok_or_else(truncated)? as usize;
            let comment_len = u16_at(bytes, at + 32).ok_or_else(truncated)? as usize;
            let mut local_header = field(42).ok_or_else(truncated)?;
            let name_at = at + 46;
            let extra_at = name_at + name_len;
            let next = extra_at + extra_len + comment_len;
            if next > end {
                return Err(truncated());
            }
            let name = String::from_utf8_lossy(&bytes[name_at..extra_at]).into_owned();
            // Sizes and offsets that overflow 32 bits live in the zip64
            // extra field, in this order, present only where maxed out.
            let mut extra = &bytes[extra_at..extra_at + extra_len];
            while extra.len() >= 4 {
                let id = u16::from_le_bytes([extra[0], extra[1]]);
                let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
                let Some(data) = extra.get(4..4 + len) else {
                    break;
                };
                if id == 1 {
                    let mut values = data
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
                    for slot in [&mut size, &mut compressed, &mut local_header] {
                        if *slot == 0xFFFF_FFFF {
                            *slot = values.next().ok_or_else(truncated)?;
                        }
                    }
                }
                extra = &extra[4 + len..];
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = entries.entry(name) {
                names.push(slot.key().clone());
                slot.insert(Entry {
                    method,
                    compressed,
                    size,
                    local_header,
                });
            }
            at = next;
        }
        Ok(Self {
            bytes,
            entries,
            names,
        })
    }

    /// Entry names in directory order (the first of any duplicates).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether the archive has an entry of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The bytes of the stored entry `name`: `Ok(None)` when there is no
    /// such entry, an error when it is compressed or runs out of the file.
    pub fn data(&self, name: &str) -> Result<Option<&'a [u8]>, String> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let bad = || format!("zip entry {name:?} runs past the end of the file (truncated?)");
        if e.method != 0 || e.compressed != e.size {
            return Err(format!(
                "zip entry {name:?} is compressed (method {}); PyTorch stores entries \
                 uncompressed",
                e.method
            ));
        }
        let header = to_usize(e.local_header)
            .filter(|&h| h < self.bytes.len())
            .ok_or_else(bad)?;
        if u32_at(self.bytes, header) != Some(LOCAL) {
            return Err(format!(
                "zip entry {name:?} has no local header where the directory says"
            ));
        }
        // header < len, so these sums cannot overflow.
        let name_len = u16_at(self.bytes, header + 26).ok_or_else(bad)? as usize;
        let extra_len = u16_at(self.bytes, header + 28).ok_or_else(bad)? as usize;
        let start = header + 30 + name_len + extra_len;
        let end = to_usize(e.size)
            .and_then(|s| start.checked_add(s))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(bad)?;
        Ok(Some(&self.bytes[start..end]))
    }
}

/// The offset of the end-of-central-directory record: the last signature
/// whose comment ends inside the file.
fn find_eocd(bytes: &[u8]) -> Option<usize> {
    let last = bytes.len().checked_sub(22)?;
    let first = last.saturating_sub(0xFFFF);
    (first..=last).rev().find(|&at| {
        u32_at(bytes, at) == Some(EOCD)
            && u16_at(bytes, at + 20).is_some_and(|c| at + 22 + c as usize <= bytes.len())
    })
}
