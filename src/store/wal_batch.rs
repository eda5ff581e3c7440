//! A SQLite VFS for the writer's connection that hands each commit's WAL frames to the
//! kernel in one write instead of two `pwrite` calls per frame.
//!
//! SQLite appends a commit to the WAL frame by frame: a 24-byte frame header, then the
//! page. With one random index page per webhook, that was some 200 small writes per
//! group commit, each touching two or three page-cache folios, and close to half of the
//! writer's time. This VFS wraps the default one and, for WAL files only, gathers
//! consecutive writes in memory and writes them out as one when SQLite syncs, reads,
//! truncates, sizes or closes the file, or asks a file control; when a write is not
//! contiguous with the gathered bytes; or when they exceed [`MAX_GATHERED`].
//!
//! # Why a commit is never acknowledged before its frames are written
//!
//! The argument rests on three facts, each checked or enforced, not assumed:
//!
//! 1. **`synchronous = FULL`.** In WAL mode SQLite then syncs the WAL at the end of
//!    every commit's frames (`walFrames`: frames, checksum rewrite, `xSync`) and only
//!    after that publishes the commit in the WAL index. Our `xSync` writes out the
//!    gathered bytes first and returns the write-out's error instead of syncing, so a
//!    failed write-out fails `walFrames`, the commit fails and the pager rolls it back:
//!    nothing is published, the caller gets the error (the writer answers 503), and after
//!    a successful commit nothing of it is left in memory. Under `synchronous = NORMAL`
//!    there is no sync at commit, so gathered frames could be published unwritten (a
//!    checksum rewrite of a commit-frame header is a 24-byte write that nothing would
//!    follow): [`require_full_sync`] refuses such a connection, and the store opens the
//!    writer only through it.
//! 2. **Power-safe overwrite.** Without it SQLite pads a commit to a sector boundary and
//!    writes the tail of the last frame *after* the sync. A WAL file whose device does
//!    not report `SQLITE_IOCAP_POWERSAFE_OVERWRITE` is therefore not gathered at all
//!    (every write goes straight through).
//! 3. **The pinned SQLite.** The default unix VFS keeps only the low 17 bits of a write
//!    length (a 128 KiB write would be a write of nothing, reported as a full disk), so
//!    write-outs go in [`WRITE_CHUNK`] pieces. This and fact 1 were read in, and the
//!    tests below run against, SQLite [`VERIFIED_SQLITE_VERSION`] (`libsqlite3-sys` is
//!    pinned with `=` in `Cargo.toml`); [`verified_sqlite`] checks the linked library at
//!    start-up, and the store falls back to the default VFS with a WARN on any other.
//!
//! A write-out drops the gathered bytes whatever its outcome, as after a failed `pwrite`.
//! Bytes can be left over from a transaction only when it was rolled back after a cache
//! spill (they lie past the last commit and are never read); the next write-out writes
//! them harmlessly, and should that fail, the transaction that triggered it fails too:
//! an error may reach a commit that did not cause it, never the other way round (no
//! commit is acknowledged with its own frames unwritten). Every other file (the database, journals) is the default VFS's own
//! file object, untouched.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::Connection;

use rusqlite::ffi;

/// The VFS name to open the writer's connection with (registered by [`register`]).
pub const VFS_NAME: &CStr = c"cashout-recon-wal-batch";

/// The SQLite release (`SQLITE_VERSION_NUMBER`) whose WAL writer and unix VFS this module
/// was verified against: 3.50.2, bundled by `libsqlite3-sys` 0.35.0. Moving the pin in
/// `Cargo.toml` means re-reading `walFrames`, `walWriteToLog` and `seekAndWriteFd` in the
/// new `sqlite3.c`, running this module's tests, and then updating this number.
pub const VERIFIED_SQLITE_VERSION: i32 = 3_050_002;

/// Whether the linked SQLite is the one the VFS was verified against; `Err` names both.
pub fn verified_sqlite() -> Result<(), String> {
    check_version(rusqlite::version_number())
}

fn check_version(linked: i32) -> Result<(), String> {
    if linked == VERIFIED_SQLITE_VERSION {
        Ok(())
    } else {
        Err(format!(
            "the WAL-gathering VFS was verified against SQLite {VERIFIED_SQLITE_VERSION}, \
             but {linked} is linked"
        ))
    }
}

/// Checks that `connection` (opened on this VFS) runs with `synchronous = FULL` or
/// `EXTRA`, which the VFS's correctness rests on (see the module doc); `Err` says why not.
pub fn require_full_sync(connection: &Connection) -> Result<(), String> {
    let level: i64 = connection
        .query_row("PRAGMA synchronous", [], |row| row.get(0))
        .map_err(|err| format!("cannot read PRAGMA synchronous: {err}"))?;
    if level >= 2 {
        Ok(())
    } else {
        Err(format!(
            "the WAL-gathering VFS needs synchronous = FULL, the connection has level {level}"
        ))
    }
}

/// Gathered bytes after which they are written out even mid-transaction.
const MAX_GATHERED: usize = 8 << 20;

/// The most handed to the default VFS in one write: its `pwrite` keeps only the low 17
/// bits of a length (a 128 KiB write would be a write of nothing, reported as a full
/// disk).
const WRITE_CHUNK: usize = 64 << 10;

/// Registers the VFS (once per process) over the default one. Errors are SQLite codes.
pub fn register() -> Result<(), c_int> {
    static REGISTERED: OnceLock<Result<(), c_int>> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find and sqlite3_vfs_register are thread-safe; the VFS
        // struct is leaked so it outlives every connection using it.
        unsafe {
            let rc = ffi::sqlite3_initialize();
            if rc != ffi::SQLITE_OK {
                return Err(rc);
            }
            let inner = ffi::sqlite3_vfs_find(ptr::null());
            if inner.is_null() {
                return Err(ffi::SQLITE_ERROR);
            }
            let vfs = Box::new(ffi::sqlite3_vfs {
                iVersion: (*inner).iVersion.min(3),
                szOsFile: (wrapper_size() + (*inner).szOsFile as usize) as c_int,
                mxPathname: (*inner).mxPathname,
                pNext: ptr::null_mut(),
                zName: VFS_NAME.as_ptr(),
                pAppData: inner.cast(),
                xOpen: Some(open),
                xDelete: (*inner).xDelete.map(|_| delete as _),
                xAccess: (*inner).xAccess.map(|_| access as _),
                xFullPathname: (*inner).xFullPathname.map(|_| full_pathname as _),
                xDlOpen: (*inner).xDlOpen.map(|_| dl_open as _),
                xDlError: (*inner).xDlError.map(|_| dl_error as _),
                xDlSym: (*inner).xDlSym.map(|_| dl_sym as _),
                xDlClose: (*inner).xDlClose.map(|_| dl_close as _),
                xRandomness: (*inner).xRandomness.map(|_| randomness as _),
                xSleep: (*inner).xSleep.map(|_| sleep as _),
                xCurrentTime: (*inner).xCurrentTime.map(|_| current_time as _),
                xGetLastError: (*inner).xGetLastError.map(|_| get_last_error as _),
                xCurrentTimeInt64: (*inner).xCurrentTimeInt64.map(|_| current_time_int64 as _),
                xSetSystemCall: None,
                xGetSystemCall: None,
                xNextSystemCall: None,
            });
            let rc = ffi::sqlite3_vfs_register(Box::into_raw(vfs), 0);
            if rc == ffi::SQLITE_OK {
                Ok(())
            } else {
                Err(rc)
            }
        }
    })
}

/// A WAL file: our methods in front, the default VFS's file object behind.
#[repr(C)]
struct GatheringFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    gathered: Vec<u8>,
    /// File offset of `gathered[0]`.
    gathered_at: i64,
    /// The device lacks power-safe overwrite: every write goes straight through.
    pass_through: bool,
    /// The file's name, for [`fault`] injection.
    #[cfg(test)]
    name: String,
}

/// Bytes before the inner file object, kept 16-aligned.
fn wrapper_size() -> usize {
    std::mem::size_of::<GatheringFile>().next_multiple_of(16)
}

unsafe fn inner_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    (*vfs).pAppData.cast()
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner = inner_vfs(vfs);
    let Some(inner_open) = (*inner).xOpen else {
        return ffi::SQLITE_ERROR;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not a WAL: the default VFS's own object, in place, with its own methods.
        return inner_open(inner, name, file, flags, out_flags);
    }
    let inner_file = file
        .cast::<u8>()
        .add(wrapper_size())
        .cast::<ffi::sqlite3_file>();
    let rc = inner_open(inner, name, inner_file, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*inner_file).pMethods.is_null() {
        // SQLite calls xClose only when pMethods is set; leave it null.
        (*file).pMethods = ptr::null();
        return if rc == ffi::SQLITE_OK {
            ffi::SQLITE_ERROR
        } else {
            rc
        };
    }
    let inner_methods = &*(*inner_file).pMethods;
    let device = inner_methods
        .xDeviceCharacteristics
        .map_or(0, |characteristics| characteristics(inner_file));
    ptr::write(
        file.cast::<GatheringFile>(),
        GatheringFile {
            base: ffi::sqlite3_file {
                pMethods: gathering_methods(inner_methods.iVersion),
            },
            inner: inner_file,
            gathered: Vec::new(),
            gathered_at: 0,
            pass_through: device & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE == 0,
            #[cfg(test)]
            name: if name.is_null() {
                String::new()
            } else {
                CStr::from_ptr(name).to_string_lossy().into_owned()
            },
        },
    );
    ffi::SQLITE_OK
}

fn gathering_methods(version: c_int) -> *const ffi::sqlite3_io_methods {
    static METHODS: OnceLock<[ffi::sqlite3_io_methods; 3]> = OnceLock::new();
    let all = METHODS.get_or_init(|| {
        let make = |version: c_int| ffi::sqlite3_io_methods {
            iVersion: version,
            xClose: Some(close),
            xRead: Some(read),
            xWrite: Some(write),
            xTruncate: Some(truncate),
            xSync: Some(sync),
            xFileSize: Some(file_size),
            xLock: Some(lock),
            xUnlock: Some(unlock),
            xCheckReservedLock: Some(check_reserved_lock),
            xFileControl: Some(file_control),
            xSectorSize: Some(sector_size),
            xDeviceCharacteristics: Some(device_characteristics),
            xShmMap: (version >= 2).then_some(shm_map as _),
            xShmLock: (version >= 2).then_some(shm_lock as _),
            xShmBarrier: (version >= 2).then_some(shm_barrier as _),
            xShmUnmap: (version >= 2).then_some(shm_unmap as _),
            xFetch: (version >= 3).then_some(fetch as _),
            xUnfetch: (version >= 3).then_some(unfetch as _),
        };
        [make(1), make(2), make(3)]
    });
    &all[(version.clamp(1, 3) - 1) as usize]
}

/// The WAL file behind `file`. Safety: SQLite calls these methods only on files whose
/// `pMethods` [`open`] set to the gathering methods, i.e. on an initialised
/// [`GatheringFile`], one call at a time (the connection's mutex or its single thread).
unsafe fn this<'a>(file: *mut ffi::sqlite3_file) -> &'a mut GatheringFile {
    &mut *file.cast::<GatheringFile>()
}

unsafe fn inner_methods(file: &GatheringFile) -> &ffi::sqlite3_io_methods {
    &*(*file.inner).pMethods
}

/// Writes the gathered bytes out; they are dropped whatever the outcome.
unsafe fn write_out(file: &mut GatheringFile) -> c_int {
    if file.gathered.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Some(inner_write) = inner_methods(file).xWrite else {
        file.gathered.clear();
        return ffi::SQLITE_IOERR_WRITE;
    };
    #[cfg(test)]
    if let Some(rc) = fault::injected(&file.name) {
        file.gathered.clear();
        return rc;
    }
    let mut rc = ffi::SQLITE_OK;
    let mut offset = file.gathered_at;
    for chunk in file.gathered.chunks(WRITE_CHUNK) {
        rc = inner_write(
            file.inner,
            chunk.as_ptr().cast(),
            chunk.len() as c_int,
            offset,
        );
        if rc != ffi::SQLITE_OK {
            break;
        }
        offset += chunk.len() as i64;
    }
    file.gathered.clear();
    if file.gathered.capacity() > MAX_GATHERED {
        file.gathered.shrink_to(MAX_GATHERED);
    }
    rc
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let this = this(file);
    let written = write_out(this);
    let closed = match inner_methods(this).xClose {
        Some(inner_close) => inner_close(this.inner),
        None => ffi::SQLITE_OK,
    };
    ptr::drop_in_place(&mut this.gathered);
    #[cfg(test)]
    ptr::drop_in_place(&mut this.name);
    if written != ffi::SQLITE_OK {
        written
    } else {
        closed
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let this = this(file);
    if this.pass_through {
        return match inner_methods(this).xWrite {
            Some(inner_write) => inner_write(this.inner, data, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        };
    }
    let contiguous = this.gathered_at + this.gathered.len() as i64 == offset;
    if !this.gathered.is_empty() && !contiguous {
        let rc = write_out(this);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if this.gathered.is_empty() {
        this.gathered_at = offset;
    }
    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), amount.max(0) as usize);
    this.gathered.extend_from_slice(bytes);
    if this.gathered.len() >= MAX_GATHERED {
        return write_out(this);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let this = this(file);
    let rc = write_out(this);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match inner_methods(this).xRead {
        Some(inner_read) => inner_read(this.inner, data, amount, offset),
        None => ffi::SQLITE_IOERR_READ,
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    let this = this(file);
    let rc = write_out(this);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match inner_methods(this).xTruncate {
        Some(inner_truncate) => inner_truncate(this.inner, size),
        None => ffi::SQLITE_IOERR_TRUNCATE,
    }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let this = this(file);
    let rc = write_out(this);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match inner_methods(this).xSync {
        Some(inner_sync) => inner_sync(this.inner, flags),
        None => ffi::SQLITE_IOERR_FSYNC,
    }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    let this = this(file);
    let rc = write_out(this);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match inner_methods(this).xFileSize {
        Some(inner_size) => inner_size(this.inner, size),
        None => ffi::SQLITE_IOERR_FSTAT,
    }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    let this = this(file);
    let rc = write_out(this);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match inner_methods(this).xFileControl {
        Some(inner_control) => inner_control(this.inner, op, arg),
        None => ffi::SQLITE_NOTFOUND,
    }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let this = this(file);
    inner_methods(this)
        .xLock
        .map_or(ffi::SQLITE_OK, |inner_lock| inner_lock(this.inner, level))
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let this = this(file);
    inner_methods(this)
        .xUnlock
        .map_or(ffi::SQLITE_OK, |inner_unlock| {
            inner_unlock(this.inner, level)
        })
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    let this = this(file);
    match inner_methods(this).xCheckReservedLock {
        Some(inner_check) => inner_check(this.inner, out),
        None => {
            *out = 0;
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    let this = this(file);
    inner_methods(this)
        .xSectorSize
        .map_or(4096, |inner_sector| inner_sector(this.inner))
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    let this = this(file);
    inner_methods(this)
        .xDeviceCharacteristics
        .map_or(0, |inner_device| inner_device(this.inner))
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let this = this(file);
    match inner_methods(this).xShmMap {
        Some(inner_map) => inner_map(this.inner, region, size, extend, out),
        None => ffi::SQLITE_IOERR_SHMMAP,
    }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    let this = this(file);
    match inner_methods(this).xShmLock {
        Some(inner_lock) => inner_lock(this.inner, offset, n, flags),
        None => ffi::SQLITE_IOERR_SHMLOCK,
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    let this = this(file);
    if let Some(inner_barrier) = inner_methods(this).xShmBarrier {
        inner_barrier(this.inner);
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    let this = this(file);
    inner_methods(this)
        .xShmUnmap
        .map_or(ffi::SQLITE_OK, |inner_unmap| {
            inner_unmap(this.inner, delete)
        })
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let this = this(file);
    let rc = write_out(this);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match inner_methods(this).xFetch {
        Some(inner_fetch) => inner_fetch(this.inner, offset, amount, out),
        None => {
            *out = ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    let this = this(file);
    inner_methods(this)
        .xUnfetch
        .map_or(ffi::SQLITE_OK, |inner_unfetch| {
            inner_unfetch(this.inner, offset, page)
        })
}

// The rest of the VFS is the default one's.

unsafe extern "C" fn delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner)
        .xDelete
        .map_or(ffi::SQLITE_IOERR_DELETE, |f| f(inner, name, sync_dir))
}

unsafe extern "C" fn access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner)
        .xAccess
        .map_or(ffi::SQLITE_IOERR_ACCESS, |f| f(inner, name, flags, out))
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    size: c_int,
    out: *mut c_char,
) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner)
        .xFullPathname
        .map_or(ffi::SQLITE_ERROR, |f| f(inner, name, size, out))
}

unsafe extern "C" fn dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    let inner = inner_vfs(vfs);
    (*inner).xDlOpen.map_or(ptr::null_mut(), |f| f(inner, name))
}

unsafe extern "C" fn dl_error(vfs: *mut ffi::sqlite3_vfs, size: c_int, out: *mut c_char) {
    let inner = inner_vfs(vfs);
    if let Some(f) = (*inner).xDlError {
        f(inner, size, out);
    }
}

unsafe extern "C" fn dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    handle: *mut c_void,
    symbol: *const c_char,
) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> {
    let inner = inner_vfs(vfs);
    (*inner).xDlSym.and_then(|f| f(inner, handle, symbol))
}

unsafe extern "C" fn dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    let inner = inner_vfs(vfs);
    if let Some(f) = (*inner).xDlClose {
        f(inner, handle);
    }
}

unsafe extern "C" fn randomness(
    vfs: *mut ffi::sqlite3_vfs,
    size: c_int,
    out: *mut c_char,
) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner).xRandomness.map_or(0, |f| f(inner, size, out))
}

unsafe extern "C" fn sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner).xSleep.map_or(0, |f| f(inner, micros))
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner)
        .xCurrentTime
        .map_or(ffi::SQLITE_ERROR, |f| f(inner, out))
}

unsafe extern "C" fn get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    size: c_int,
    out: *mut c_char,
) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner).xGetLastError.map_or(0, |f| f(inner, size, out))
}

unsafe extern "C" fn current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    let inner = inner_vfs(vfs);
    (*inner)
        .xCurrentTimeInt64
        .map_or(ffi::SQLITE_ERROR, |f| f(inner, out))
}

/// Test-only fault injection: makes the write-outs of one WAL file fail, as a full disk
/// or an I/O error would.
#[cfg(test)]
pub(crate) mod fault {
    use std::ffi::c_int;
    use std::sync::Mutex;

    /// (end of the WAL's path, the code to return, write-outs left to fail).
    static ARMED: Mutex<Vec<(String, c_int, u32)>> = Mutex::new(Vec::new());

    /// The next `times` write-outs of the WAL whose path ends with `suffix` fail with
    /// `code` (`u32::MAX`: until [`clear`]).
    pub fn fail_write_outs(suffix: &str, code: c_int, times: u32) {
        if let Ok(mut armed) = ARMED.lock() {
            armed.retain(|(armed_suffix, _, _)| armed_suffix != suffix);
            armed.push((suffix.to_string(), code, times));
        }
    }

    /// Ends the faults of `suffix`.
    pub fn clear(suffix: &str) {
        if let Ok(mut armed) = ARMED.lock() {
            armed.retain(|(armed_suffix, _, _)| armed_suffix != suffix);
        }
    }

    /// The code a write-out of the file `name` must fail with, if one is armed.
    pub(super) fn injected(name: &str) -> Option<c_int> {
        let mut armed = ARMED.lock().ok()?;
        let entry = armed
            .iter_mut()
            .find(|(suffix, _, left)| *left > 0 && name.ends_with(suffix.as_str()))?;
        if entry.2 != u32::MAX {
            entry.2 -= 1;
        }
        Some(entry.1)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection, OpenFlags};

    use super::*;

    /// Deterministic filler bytes, different for every row.
    fn filler(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn check_commits_through_the_vfs(synchronous: &str, cache_pages: i64) {
        register().expect("register the VFS");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gather.db");
        let writer = Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), VFS_NAME)
            .expect("open");
        writer
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
                 PRAGMA cache_size = {cache_pages};
                 CREATE TABLE rows (id INTEGER PRIMARY KEY, key BLOB NOT NULL, data BLOB NOT NULL);
                 CREATE UNIQUE INDEX rows_by_key ON rows (key);"
            ))
            .expect("schema");
        // Another connection, on the default VFS, as the store's readers are.
        let reader = Connection::open(&path).expect("reader");
        let mut expected_rows = 0_i64;
        let mut expected_bytes = 0_i64;
        for round in 0..150_u64 {
            // Mostly small groups of random-key rows; now and then one far larger than
            // the gathering limit (and than the page cache, so pages spill mid-write).
            let (rows, bytes) = if round % 50 == 49 {
                (40, 300_000)
            } else {
                (25, 400)
            };
            let transaction = writer.unchecked_transaction().expect("begin");
            for row in 0..rows {
                let seed = round * 1_000 + row;
                transaction
                    .execute(
                        "INSERT INTO rows (key, data) VALUES (?1, ?2)",
                        params![filler(seed, 16), filler(seed + 7, bytes)],
                    )
                    .expect("insert");
                expected_rows += 1;
                expected_bytes += bytes as i64;
            }
            transaction.commit().expect("commit");
            // The commit is visible to another connection as soon as it returns.
            let (count, total): (i64, i64) = reader
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM rows",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .expect("read");
            assert_eq!(
                (count, total),
                (expected_rows, expected_bytes),
                "after round {round}"
            );
        }
        // The WAL the gathered writes produced is one SQLite reads back in full.
        let wal_pages: i64 = reader
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .expect("checkpoint");
        assert!(wal_pages > 0);
        let check: String = reader
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity check");
        assert_eq!(check, "ok");
        let sample: Vec<u8> = reader
            .query_row(
                "SELECT data FROM rows WHERE key = ?1",
                [filler(49_017, 16)],
                |r| r.get(0),
            )
            .expect("a large row");
        assert_eq!(sample, filler(49_024, 300_000));
    }

    #[test]
    fn commits_are_visible_and_intact_with_full_sync() {
        check_commits_through_the_vfs("FULL", 2_000);
    }

    #[test]
    fn the_linked_sqlite_is_the_verified_one() {
        assert_eq!(verified_sqlite(), Ok(()));
        assert!(check_version(VERIFIED_SQLITE_VERSION + 1).is_err());
    }

    #[test]
    fn a_connection_without_full_sync_is_refused() {
        register().expect("register the VFS");
        let dir = tempfile::tempdir().expect("temp dir");
        let connection = Connection::open_with_flags_and_vfs(
            dir.path().join("sync.db"),
            OpenFlags::default(),
            VFS_NAME,
        )
        .expect("open");
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .expect("pragmas");
        assert!(require_full_sync(&connection).is_err());
        connection
            .execute_batch("PRAGMA synchronous = FULL;")
            .expect("full");
        assert_eq!(require_full_sync(&connection), Ok(()));
    }

    fn open_gathering(path: &std::path::Path, cache_pages: i64) -> Connection {
        register().expect("register the VFS");
        let writer = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), VFS_NAME)
            .expect("open");
        writer
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
                 PRAGMA cache_size = {cache_pages};
                 CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, data BLOB NOT NULL);"
            ))
            .expect("schema");
        writer
    }

    fn ids(connection: &Connection) -> Vec<i64> {
        let mut statement = connection
            .prepare("SELECT id FROM rows ORDER BY id")
            .expect("prepare");
        let rows = statement
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<Vec<i64>, _>>()
            .expect("ids");
        rows
    }

    fn commit_rows(
        writer: &Connection,
        first_id: i64,
        rows: i64,
        bytes: usize,
    ) -> rusqlite::Result<()> {
        let transaction = writer.unchecked_transaction()?;
        for id in first_id..first_id + rows {
            transaction.execute(
                "INSERT INTO rows (id, data) VALUES (?1, ?2)",
                params![id, filler(id as u64, bytes)],
            )?;
        }
        transaction.commit()
    }

    /// A copy of the database and its WAL as they are on disk now, as after `kill -9`.
    fn crash_copy(path: &std::path::Path, into: &std::path::Path) -> Connection {
        std::fs::copy(path, into).expect("copy the database");
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let mut copy_wal = into.as_os_str().to_owned();
        copy_wal.push("-wal");
        std::fs::copy(&wal, &copy_wal).expect("copy the WAL");
        Connection::open(into).expect("open the copy")
    }

    fn check_a_failed_write_out(wal_suffix: &str, rows: i64, bytes: usize, cache_pages: i64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(format!("{wal_suffix}.db"));
        let writer = open_gathering(&path, cache_pages);
        let reader = Connection::open(&path).expect("reader");
        commit_rows(&writer, 1, 3, 100).expect("first commit");

        fault::fail_write_outs(&format!("{wal_suffix}.db-wal"), ffi::SQLITE_FULL, 1);
        let failed = commit_rows(&writer, 100, rows, bytes)
            .expect_err("the commit whose frames were not written must fail");
        assert_eq!(
            failed.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DiskFull)
        );
        fault::clear(&format!("{wal_suffix}.db-wal"));
        assert!(writer.is_autocommit(), "the failed transaction is over");
        assert_eq!(
            ids(&reader),
            vec![1, 2, 3],
            "nothing of the failed commit is visible"
        );

        // Later commits succeed, on the same connection.
        commit_rows(&writer, 10, 2, 100).expect("a later commit");
        assert_eq!(ids(&reader), vec![1, 2, 3, 10, 11]);
        // What recovery finds on disk: every acknowledged commit, nothing of the failed one.
        let copy = crash_copy(&path, &dir.path().join("copy.db"));
        assert_eq!(ids(&copy), vec![1, 2, 3, 10, 11]);
        let check: String = copy
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity check");
        assert_eq!(check, "ok");
    }

    #[test]
    fn a_failed_write_out_fails_its_commit_and_later_commits_succeed() {
        check_a_failed_write_out("fault-small", 5, 300, 2_000);
    }

    #[test]
    fn a_failed_write_out_mid_transaction_fails_that_transaction() {
        // Over the gathering limit and the page cache: write-outs before the commit.
        check_a_failed_write_out("fault-large", 40, 300_000, 16);
    }

    #[test]
    fn a_small_page_cache_spills_and_reads_back_its_own_frames() {
        check_commits_through_the_vfs("FULL", 16);
    }
}
