//! WordPiece tokenization with character offsets and the word → sub-token alignment.

use std::ops::Range;

use tokenizers::Tokenizer;

use super::EncoderError;
use crate::data::Word;

/// One tokenized text: `[CLS] sub-tokens [SEP]`, offsets in characters.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    /// Half-open character offsets of each token; `(0, 0)` for `[CLS]` and `[SEP]`.
    pub offsets: Vec<(usize, usize)>,
}

impl TokenizedText {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// For each word, the range of token indices whose start lies inside it.
    ///
    /// BERT's pre-tokenizer splits on whitespace and punctuation, so a sub-token never
    /// straddles two whitespace-separated words; a word the tokenizer drops entirely
    /// (control characters) gets an empty range.
    pub fn align_words(&self, words: &[Word]) -> Vec<Range<usize>> {
        let mut ranges = Vec::with_capacity(words.len());
        let mut t = 1; // skip [CLS]
        let last = self.ids.len().saturating_sub(1); // [SEP]
        for w in words {
            while t < last && self.offsets[t].0 < w.start {
                t += 1;
            }
            let first = t;
            while t < last && self.offsets[t].0 < w.end {
                t += 1;
            }
            ranges.push(first..t);
        }
        ranges
    }
}

/// Loads `tokenizer.json` with truncation and padding switched off: nearspan pads
/// batches itself and refuses over-long inputs instead of silently cutting them.
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer, EncoderError> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| EncoderError::Tokenizer { path: path.to_path_buf(), message: e.to_string() })?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| EncoderError::Tokenizer { path: path.to_path_buf(), message: e.to_string() })?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<TokenizedText, EncoderError> {
    let enc = tokenizer
        .encode_char_offsets(text, true)
        .map_err(|e| EncoderError::Tokenize { text: text.chars().take(60).collect(), message: e.to_string() })?;
    Ok(TokenizedText {
        ids: enc.get_ids().to_vec(),
        tokens: enc.get_tokens().to_vec(),
        offsets: enc.get_offsets().to_vec(),
    })
}
