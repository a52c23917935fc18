//! Script output: splitting bytes into lines, and the per-script log.
//!
//! Every line is appended to `output.log` (one JSON object per line, line `i` of
//! the file is sequence `i`) as it is read, so the log survives a tentacle restart.
//! The most recent lines are also kept in memory for live readers; older lines are
//! read back from the file through an index of byte offsets.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use octo_proto::v1::{LogLine, LogStream};
use serde::{Deserialize, Serialize};

/// Lines kept in memory per script, at most.
const MEM_LINES: usize = 20_000;
/// Bytes of line text kept in memory per script, at most.
const MEM_BYTES: usize = 16 << 20;
/// Bytes a line is counted as beyond its text, for reply budgets.
pub(crate) const LINE_OVERHEAD: usize = 32;

/// Splits a byte stream into lines: `\n` ends a line, a `\r` before it is dropped,
/// lines longer than `max` bytes are cut into pieces of at most `max` bytes (at a
/// UTF-8 character boundary when there is one nearby). Bytes are decoded lossily.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(16),
        }
    }

    /// Feeds bytes, appending the lines they complete to `out`.
    pub(crate) fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            self.buf.extend_from_slice(&data[..i]);
            data = &data[i + 1..];
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            self.cut(0, out);
            out.push(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
        self.buf.extend_from_slice(data);
        // Keep one byte back: it may be the '\r' of a "\r\n" not read yet.
        self.cut(1, out);
    }

    /// The unterminated rest, if any (at end of stream).
    pub(crate) fn finish(&mut self, out: &mut Vec<String>) {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        self.cut(0, out);
        if !self.buf.is_empty() {
            out.push(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
    }

    /// Emits `max`-byte pieces while more than `max + keep` bytes are buffered.
    fn cut(&mut self, keep: usize, out: &mut Vec<String>) {
        while self.buf.len() > self.max + keep {
            let mut end = self.max;
            // Back up over at most 3 continuation bytes to a character boundary.
            for _ in 0..3 {
                if is_continuation(self.buf[end]) && end > 1 {
                    end -= 1;
                } else {
                    break;
                }
            }
            if is_continuation(self.buf[end]) {
                end = self.max; // not UTF-8 anyway
            }
            out.push(String::from_utf8_lossy(&self.buf[..end]).into_owned());
            self.buf.drain(..end);
        }
    }
}

fn is_continuation(b: u8) -> bool {
    b & 0b1100_0000 == 0b1000_0000
}

/// One line of `output.log`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredLine {
    seq: u64,
    ts: i64,
    stream: String,
    text: String,
}

fn stream_name(s: i32) -> &'static str {
    match LogStream::try_from(s) {
        Ok(LogStream::Stdout) => "stdout",
        Ok(LogStream::Stderr) => "stderr",
        Ok(LogStream::Service) => "service",
        _ => "unspecified",
    }
}

fn stream_from_name(s: &str) -> LogStream {
    match s {
        "stdout" => LogStream::Stdout,
        "stderr" => LogStream::Stderr,
        "service" => LogStream::Service,
        _ => LogStream::Unspecified,
    }
}

/// A page of lines.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub(crate) lines: Vec<LogLine>,
    /// Sequence to ask for next.
    pub(crate) next: u64,
    /// More lines exist from `next` on.
    pub(crate) more: bool,
}

/// What a read needs.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Served from memory.
    Done(Page),
    /// The file index must be built first ([`build_index`]), then plan again.
    NeedIndex(PathBuf),
    /// Lines must be read from the file ([`read_file`]).
    File(FileRead),
}

/// A range of `output.log` to read.
#[derive(Debug)]
pub(crate) struct FileRead {
    path: PathBuf,
    start: u64,
    end: u64,
    first_seq: u64,
    next: u64,
    more: bool,
}

/// The log of one script.
///
/// Invariant: lines `0..offsets.len()` are in the file (line `i` starts at
/// `offsets[i]`, the last ends at `end`); lines `mem_first..total` are in memory;
/// `mem_first <= offsets.len()`, so every line is in one place or both.
#[derive(Debug)]
pub(crate) struct LogStore {
    path: PathBuf,
    /// Open for appending while the script may still write; `None` once a write
    /// failed (later lines stay in memory only) or after completion.
    file: Option<File>,
    /// `None` until built, for a log found on disk at startup.
    offsets: Option<Vec<u64>>,
    end: u64,
    mem: VecDeque<LogLine>,
    mem_bytes: usize,
    total: u64,
}

impl LogStore {
    /// A new, empty log whose lines go to `path` once [`LogStore::attach`]ed.
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            offsets: Some(Vec::new()),
            end: 0,
            mem: VecDeque::new(),
            mem_bytes: 0,
            total: 0,
        }
    }

    /// A log on disk from a previous run; indexed lazily.
    pub(crate) fn existing(path: PathBuf) -> Self {
        Self {
            offsets: None,
            ..Self::new(path)
        }
    }

    /// Starts writing to `file` (empty, opened for appending). Lines appended before
    /// stay in memory only.
    pub(crate) fn attach(&mut self, file: File) {
        if self.total == 0 {
            self.file = Some(file);
        }
    }

    /// Stops writing to the file (the script is complete). When every line is in the
    /// file, the memory copy is dropped: a completed script waiting to be collected
    /// holds no log in memory.
    pub(crate) fn close(&mut self) {
        self.file = None;
        if self.offsets.as_ref().map(|o| o.len() as u64) == Some(self.total) {
            self.mem.clear();
            self.mem_bytes = 0;
        }
    }

    /// Number of lines.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    fn mem_first(&self) -> u64 {
        self.total - self.mem.len() as u64
    }

    /// Installs an index built by [`build_index`] (for a log found on disk) and opens
    /// the file for appending further lines (after cutting off a torn last line).
    pub(crate) fn install_index(&mut self, index: Index) {
        if self.offsets.is_some() {
            return;
        }
        self.total = index.offsets.len() as u64;
        self.end = index.end;
        self.offsets = Some(index.offsets);
        self.mem.clear();
        self.mem_bytes = 0;
    }

    /// Opens the file again for appending (recovery notes); cuts a torn last line.
    pub(crate) fn reopen(&mut self) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.set_len(self.end)?;
        self.file = Some(file);
        Ok(())
    }

    /// Appends lines with consecutive sequences; returns how many.
    pub(crate) fn append(&mut self, stream: LogStream, texts: Vec<String>, ts: i64) -> usize {
        let n = texts.len();
        let mut encoded = Vec::new();
        let mut starts = Vec::with_capacity(n);
        let writing = self.file.is_some() && self.offsets.is_some();
        for text in texts {
            let line = LogLine {
                sequence: self.total,
                timestamp_unix_ms: ts,
                stream: stream as i32,
                text,
            };
            if writing {
                starts.push(self.end + encoded.len() as u64);
                let stored = StoredLine {
                    seq: line.sequence,
                    ts,
                    stream: stream_name(line.stream).to_string(),
                    text: line.text.clone(),
                };
                if serde_json::to_writer(&mut encoded, &stored).is_ok() {
                    encoded.push(b'\n');
                }
            }
            self.mem_bytes += line.text.len() + LINE_OVERHEAD;
            self.mem.push_back(line);
            self.total += 1;
        }
        if writing {
            if let Some(file) = self.file.as_mut() {
                match file.write_all(&encoded) {
                    Ok(()) => {
                        self.end += encoded.len() as u64;
                        if let Some(o) = self.offsets.as_mut() {
                            o.extend(starts);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            path = %self.path.display(),
                            "cannot append to the script log ({e}); further lines are kept in memory only"
                        );
                        self.file = None;
                    }
                }
            }
        }
        self.trim();
        n
    }

    /// Drops the oldest in-memory lines that are also in the file, down to the limits.
    fn trim(&mut self) {
        let in_file = self.offsets.as_ref().map_or(0, |o| o.len() as u64);
        while (self.mem.len() > MEM_LINES || self.mem_bytes > MEM_BYTES)
            && self.mem_first() < in_file
        {
            if let Some(l) = self.mem.pop_front() {
                self.mem_bytes -= l.text.len() + LINE_OVERHEAD;
            }
        }
    }

    /// Plans reading lines from `since`, at most `max_lines` lines and about
    /// `max_bytes` bytes (at least one line).
    pub(crate) fn plan(&self, since: u64, max_lines: usize, max_bytes: usize) -> Plan {
        let Some(offsets) = self.offsets.as_ref() else {
            return Plan::NeedIndex(self.path.clone());
        };
        if since >= self.total {
            return Plan::Done(Page {
                lines: Vec::new(),
                next: self.total,
                more: false,
            });
        }
        let mem_first = self.mem_first();
        if since >= mem_first {
            let mut lines = Vec::new();
            let mut bytes = 0;
            for l in self.mem.iter().skip((since - mem_first) as usize) {
                let size = l.text.len() + LINE_OVERHEAD;
                if !lines.is_empty() && (lines.len() >= max_lines || bytes + size > max_bytes) {
                    break;
                }
                bytes += size;
                lines.push(l.clone());
            }
            let next = since + lines.len() as u64;
            return Plan::Done(Page {
                lines,
                next,
                more: next < self.total,
            });
        }
        // From the file: [since, stop), bounded by the budget.
        let stop_limit = mem_first.min(offsets.len() as u64);
        let start = offsets[since as usize];
        let line_end = |i: u64| offsets.get(i as usize + 1).copied().unwrap_or(self.end);
        // `stop` is one past the last line taken; the first line is always taken.
        let mut stop = since + 1;
        while stop < stop_limit
            && ((stop - since) as usize) < max_lines
            && (line_end(stop) - start) as usize <= max_bytes
        {
            stop += 1;
        }
        let end = offsets.get(stop as usize).copied().unwrap_or(self.end);
        Plan::File(FileRead {
            path: self.path.clone(),
            start,
            end,
            first_seq: since,
            next: stop,
            more: stop < self.total,
        })
    }
}

/// Byte offsets of the complete lines of a log file.
#[derive(Debug)]
pub(crate) struct Index {
    offsets: Vec<u64>,
    end: u64,
}

/// Indexes `path` (missing file: empty). A torn last line (no newline) is ignored.
pub(crate) fn build_index(path: &Path) -> Index {
    let mut offsets = Vec::new();
    let mut end = 0u64;
    if let Ok(file) = File::open(path) {
        let mut reader = BufReader::with_capacity(256 << 10, file);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(n) if line.last() == Some(&b'\n') => {
                    offsets.push(end);
                    end += n as u64;
                }
                Ok(_) => break, // torn
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot read the script log: {e}");
                    break;
                }
            }
        }
    }
    Index { offsets, end }
}

/// Reads a planned range of the file.
pub(crate) fn read_file(read: &FileRead) -> std::io::Result<Page> {
    let mut file = File::open(&read.path)?;
    file.seek(SeekFrom::Start(read.start))?;
    let mut bytes = Vec::with_capacity((read.end - read.start) as usize);
    file.take(read.end - read.start).read_to_end(&mut bytes)?;
    let mut lines = Vec::with_capacity((read.next - read.first_seq) as usize);
    for (i, raw) in bytes
        .split(|b| *b == b'\n')
        .take((read.next - read.first_seq) as usize)
        .enumerate()
    {
        let seq = read.first_seq + i as u64;
        lines.push(match serde_json::from_slice::<StoredLine>(raw) {
            Ok(s) => LogLine {
                sequence: seq,
                timestamp_unix_ms: s.ts,
                stream: stream_from_name(&s.stream) as i32,
                text: s.text,
            },
            Err(_) => LogLine {
                sequence: seq,
                timestamp_unix_ms: 0,
                stream: LogStream::Service as i32,
                text: "(this log line could not be read back from output.log)".into(),
            },
        });
    }
    Ok(Page {
        lines,
        next: read.next,
        more: read.more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn splits_lines_and_crlf() {
        assert_eq!(
            split(64, &[b"a\r", b"\nb\n\nc"]),
            vec!["a".to_string(), "b".into(), "".into(), "c".into()]
        );
    }

    #[test]
    fn long_lines_are_cut_at_char_boundaries() {
        let line = "é".repeat(20); // 40 bytes
        let out = split(16, &[line.as_bytes(), b"\n"]);
        assert!(out.iter().all(|l| l.len() <= 16 && !l.contains('\u{FFFD}')));
        assert_eq!(out.concat(), line);
        let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let out = split(100, &[&binary]);
        assert!(out.len() >= 4);
    }

    #[test]
    fn store_reads_from_memory_and_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("output.log");
        let mut store = LogStore::new(path.clone());
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        store.attach(file);
        let texts: Vec<String> = (0..30_000).map(|i| format!("line {i}")).collect();
        store.append(LogStream::Stdout, texts, 1);
        assert_eq!(store.total(), 30_000);
        match store.plan(0, 5, 1 << 20) {
            Plan::File(r) => {
                let page = read_file(&r).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(page.lines.len(), 5);
                assert_eq!(page.lines[4].text, "line 4");
                assert_eq!(page.next, 5);
                assert!(page.more);
            }
            other => panic!("{other:?}"),
        }
        match store.plan(29_990, 100, 1 << 20) {
            Plan::Done(p) => {
                assert_eq!(p.lines.len(), 10);
                assert!(!p.more);
            }
            other => panic!("{other:?}"),
        }
        let idx = build_index(&path);
        let mut again = LogStore::existing(path);
        again.install_index(idx);
        assert_eq!(again.total(), 30_000);
        match again.plan(29_999, 100, 1 << 20) {
            Plan::File(r) => {
                let page = read_file(&r).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(page.lines[0].text, "line 29999");
                assert_eq!(page.lines[0].sequence, 29_999);
            }
            other => panic!("{other:?}"),
        }
    }
}
