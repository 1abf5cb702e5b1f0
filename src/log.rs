//! A one-line-per-event logger on stderr with a global level.
//!
//! Log lines carry client-controlled text (a percent-decoded uid, a path, header
//! values in error messages), so every line is escaped as it is written: a control
//! character or a line separator can neither start a forged line nor hide part of
//! one in a terminal.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::config::LogLevel;

static LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Info as u8);

pub fn set_level(level: LogLevel) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: LogLevel) -> bool {
    level as u8 >= LEVEL.load(Ordering::Relaxed)
}

/// UTC, so lines from nodes in different zones sort together.
pub fn timestamp() -> impl std::fmt::Display {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ")
}

/// Writes through to `out`, escaping what could break a line: C0 and C1 controls,
/// DEL, U+2028/U+2029 and the backslash itself (so an escape in the text cannot
/// pass for one made here).
pub struct Escaped<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\\' => self.0.write_str("\\\\")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\\' | '\u{2028}' | '\u{2029}')
}

/// The text of `args`, escaped as [`Escaped`] does.
pub fn escape(args: fmt::Arguments<'_>) -> String {
    let mut out = Escaped(String::new());
    let _ = out.write_fmt(args);
    out.0
}

/// Writes one line: the fixed prefix as is, the message escaped. One `write_all`,
/// so lines from several threads do not interleave.
pub fn line(tag: &str, args: fmt::Arguments<'_>) {
    let text = format!("{} wspush {tag} {}\n", timestamp(), escape(args));
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $tag:literal, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::line($tag, format_args!($($arg)*));
        }
    };
}

#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::config::LogLevel::Debug, "debug", $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::config::LogLevel::Info, "info", $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::config::LogLevel::Warn, "warn", $($arg)*) }; }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_separators_are_escaped() {
        let uid = "a\nwspush warn forged\r\u{1b}[31m\u{85}\u{2028}\\n\u{7f}";
        assert_eq!(
            escape(format_args!("ws open uid={uid} peer=1")),
            "ws open uid=a\\nwspush warn forged\\r\\u{1b}[31m\\u{85}\\u{2028}\\\\n\\u{7f} peer=1"
        );
        assert_eq!(escape(format_args!("plain é ✓ {}", 7)), "plain é ✓ 7");
        assert_eq!(escape(format_args!("tab\there")), "tab\\there");
    }
}
