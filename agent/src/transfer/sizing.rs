//! Pure sizing decisions of a transfer: whether the object store takes a
//! file of the size the server claims, the multipart part size, how much
//! buffer to set aside up front, and how many SFTP read requests to keep in
//! flight.
//!
//! **Invariant:** no size a server reports sizes an allocation. A claimed
//! size over [`MAX_OBJECT_SIZE`] fails before anything is read; below it,
//! buffers are reserved up to [`MAX_PREALLOCATION`] and grow only with the
//! bytes that really arrive, never past one part.

/// One mebibyte.
pub(super) const MIB: u64 = 1024 * 1024;
/// Smallest part ferry uploads. S3 requires 5 MiB for every part but the
/// last; 8 MiB halves the request count at little memory cost.
pub(crate) const MIN_PART_SIZE: u64 = 8 * MIB;
/// S3's limit on the parts of one multipart upload.
pub(crate) const MAX_PARTS: u64 = 10_000;
/// One tebibyte.
const TIB: u64 = 1024 * 1024 * MIB;
/// The largest object S3 stores (5 TiB): a larger file can never be
/// stored, so it fails permanently before it is read.
pub(crate) const MAX_OBJECT_SIZE: u64 = 5 * TIB;
/// The most buffer reserved before bytes arrive. A part buffer of a file
/// larger than this grows as it fills, so a size that lies costs nothing
/// until the server really sends the bytes.
pub(crate) const MAX_PREALLOCATION: usize = 16 * MIB as usize;
/// Bytes of SFTP read requests to keep in flight; divided by the server's
/// read chunk to give the request count (see [`read_window`]).
pub(super) const READ_WINDOW_BYTES: u64 = 4 * MIB;
/// Bounds of the number of pipelined read requests.
const MIN_READS_IN_FLIGHT: usize = 16;
const MAX_READS_IN_FLIGHT: usize = 64;

/// Part size for a file of `file_size` bytes: at least [`MIN_PART_SIZE`],
/// and large enough that the file needs at most [`MAX_PARTS`] parts, rounded
/// up to a whole MiB.
pub(crate) fn part_size(file_size: u64) -> u64 {
    let needed = file_size.div_ceil(MAX_PARTS);
    needed.div_ceil(MIB).saturating_mul(MIB).max(MIN_PART_SIZE)
}

/// Whether the object store takes a file of `size` bytes; the error says
/// why not (the task fails permanently).
pub(crate) fn check_object_size(size: u64) -> Result<(), String> {
    if size <= MAX_OBJECT_SIZE {
        return Ok(());
    }
    Err(format!(
        "the server reports a size of {size} bytes, over the object store's limit of \
         {MAX_OBJECT_SIZE} bytes (5 TiB for S3) for one object; nothing was read"
    ))
}

/// Bytes to reserve for a buffer that will hold up to `part_len` bytes of
/// a file of `size` bytes: the smaller of the two, and at most
/// [`MAX_PREALLOCATION`].
pub(crate) fn buffer_reservation(part_len: u64, size: u64) -> usize {
    let wanted = part_len.min(size);
    usize::try_from(wanted)
        .unwrap_or(usize::MAX)
        .min(MAX_PREALLOCATION)
}

/// Number of read requests of `chunk` bytes to keep in flight: about
/// [`READ_WINDOW_BYTES`], within 16..=64 requests.
pub(crate) fn read_window(chunk: u32) -> usize {
    let by_bytes = READ_WINDOW_BYTES / u64::from(chunk.max(1));
    usize::try_from(by_bytes)
        .unwrap_or(MAX_READS_IN_FLIGHT)
        .clamp(MIN_READS_IN_FLIGHT, MAX_READS_IN_FLIGHT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_medium_files_use_the_minimum() {
        assert_eq!(part_size(0), MIN_PART_SIZE);
        assert_eq!(part_size(1), MIN_PART_SIZE);
        assert_eq!(part_size(300 * MIB), MIN_PART_SIZE);
        // 10,000 parts of 8 MiB is the largest file at the minimum size.
        assert_eq!(part_size(MAX_PARTS * MIN_PART_SIZE), MIN_PART_SIZE);
    }

    #[test]
    fn huge_files_stay_within_the_part_limit() {
        let just_over = MAX_PARTS * MIN_PART_SIZE + 1;
        assert_eq!(part_size(just_over), 9 * MIB);
        for size in [
            just_over,
            100 * 1024 * MIB,
            5 * 1024 * 1024 * MIB, // 5 TiB, the S3 object limit
            u64::MAX / 2,
        ] {
            let part = part_size(size);
            assert_eq!(part % MIB, 0, "{size}: {part} is not a MiB multiple");
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}: {part}");
        }
        // 5 TiB needs 525 MiB parts, under S3's 5 GiB part limit.
        assert_eq!(part_size(5 * 1024 * 1024 * MIB), 525 * MIB);
    }

    #[test]
    fn sizes_over_the_object_limit_are_refused() {
        assert_eq!(check_object_size(0), Ok(()));
        assert_eq!(check_object_size(MAX_OBJECT_SIZE), Ok(()));
        let lie = check_object_size(1 << 60).unwrap_err();
        assert!(lie.contains("1152921504606846976 bytes"), "{lie}");
        assert!(lie.contains("5 TiB"), "{lie}");
        assert!(check_object_size(MAX_OBJECT_SIZE + 1).is_err());
        assert!(check_object_size(u64::MAX).is_err());
    }

    #[test]
    fn reservations_never_follow_a_claimed_size() {
        assert_eq!(buffer_reservation(8 * MIB, 100), 100);
        assert_eq!(buffer_reservation(8 * MIB, 300 * MIB), 8 * MIB as usize);
        // The largest storable file has 525 MiB parts: reserved as they fill.
        let big = MAX_OBJECT_SIZE;
        assert_eq!(buffer_reservation(part_size(big), big), MAX_PREALLOCATION);
        assert_eq!(buffer_reservation(u64::MAX, u64::MAX), MAX_PREALLOCATION);
    }

    #[test]
    fn read_window_covers_about_four_mib() {
        assert_eq!(read_window(261_120), 16); // OpenSSH
        assert_eq!(read_window(32 * 1024), 64); // SFTP minimum, capped
        assert_eq!(read_window(1024 * 1024), 16); // floor
        assert_eq!(read_window(0), 64);
    }
}
