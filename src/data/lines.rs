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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(bytes: &[u8]) -> Result<Vec<String>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, bytes).unwrap();
        read_lines(&path)
    }

    #[test]
    fn newlines_bom_and_blank_lines() {
        assert_eq!(lines_of(b"").unwrap(), Vec::<String>::new());
        assert_eq!(lines_of(b"a\n").unwrap(), ["a"]);
        assert_eq!(lines_of(b"a\r\n\r\nb").unwrap(), ["a", "", "b"]);
        assert_eq!(lines_of(b"a\n\n").unwrap(), ["a", ""]);
        assert_eq!(lines_of("\u{feff}x".as_bytes()).unwrap(), ["x"]);
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let err = lines_of(b"ok\nok\n\xc3(\n").unwrap_err();
        assert!(matches!(err, DataError::InvalidUtf8 { line: 3, .. }), "{err}");
    }
}
