//! Splitting raw text into words, the units spans start and end on.

use super::punct::{is_cjk_ideograph, is_punctuation};
use super::Word;

/// Splits `text` into words the way BERT's BasicTokenizer does: at whitespace, and every
/// punctuation character (ASCII or Unicode category P) and every CJK ideograph becomes a
/// word of its own. So `"lights."` gives `lights` and `.`, and `"it's"` gives `it`, `'`, `s`.
///
/// Why BERT's rules: the encoder never puts a token boundary inside one of these words,
/// and never joins two of them into one token, so every word maps to whole tokens.
/// Offsets are characters.
///
/// ```
/// use nearspan::data::{char_slice, segment_words};
/// let text = "Turn on the lights.";
/// let words: Vec<&str> = segment_words(text).iter().map(|w| char_slice(text, w.start, w.end)).collect();
/// assert_eq!(words, ["Turn", "on", "the", "lights", "."]);
/// ```
pub fn segment_words(text: &str) -> Vec<Word> {
    let mut words = Vec::new();
    let mut start: Option<usize> = None;
    for (pos, c) in text.chars().enumerate() {
        let alone = is_punctuation(c) || is_cjk_ideograph(c);
        if c.is_whitespace() || alone {
            if let Some(s) = start.take() {
                words.push(Word { start: s, end: pos });
            }
            if alone {
                words.push(Word { start: pos, end: pos + 1 });
            }
        } else if start.is_none() {
            start = Some(pos);
        }
    }
    if let Some(s) = start {
        words.push(Word { start: s, end: text.chars().count() });
    }
    words
}
