//! Line-oriented text files (JointBERT, CoNLL): UTF-8 checked per line, so an encoding
//! error names its line instead of failing the whole file.

use std::path::Path;

use super::DataError;

/// The file's lines without their `\n` / `\r\n`, and without a leading byte-order mark.
/// A final newline does not make an extra empty line.
pub(crate) fn read_lines(path: &Path) -> Result<Vec<String>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            String::from_utf8(line.to_vec())
                .map_err(|_| DataError::InvalidUtf8 { path: path.to_path_buf(), line: i + 1 })
        })
        .collect()
}
