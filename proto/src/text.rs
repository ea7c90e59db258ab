//! Text that came from outside (a job's error, a worker's message, a
//! client's name), kept within a byte bound without splitting a character.

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on
/// a character boundary.
pub fn prefix_within(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    // A UTF-8 character is at most 4 bytes: this steps back at most 3.
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Cuts `text` to at most `max_bytes` bytes on a character boundary; when
/// it cuts, the result ends with `marker` (and still fits `max_bytes`, if
/// the marker itself does).
pub fn cut(text: &mut String, max_bytes: usize, marker: &str) {
    if text.len() <= max_bytes {
        return;
    }
    let keep = prefix_within(text, max_bytes.saturating_sub(marker.len())).len();
    text.truncate(keep);
    text.push_str(marker);
}

/// `text` for a message that quotes it: whole when it fits `max_bytes`,
/// otherwise its prefix within the bound and an ellipsis.
pub fn shortened(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    format!("{}…", prefix_within(text, max_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_land_on_character_boundaries() {
        let text = "x".to_string() + &"é".repeat(3000);
        for max in [0, 1, 2, 3, 4, 4095, 4096, 4097] {
            let prefix = prefix_within(&text, max);
            assert!(prefix.len() <= max && max - prefix.len() < 4, "{max}");
            assert!(text.starts_with(prefix));
        }
        assert_eq!(prefix_within("short", 100), "short");
        assert_eq!(prefix_within("日本", 5), "日");

        let mut long = text.clone();
        cut(&mut long, 4096, " [cut]");
        assert!(
            long.len() <= 4096 && long.ends_with(" [cut]"),
            "{}",
            long.len()
        );
        assert_eq!(shortened("éé", 3), "é…");
        assert_eq!(shortened("éé", 4), "éé");
        let mut short = "fits".to_string();
        cut(&mut short, 4, " [cut]");
        assert_eq!(short, "fits");
    }
}
