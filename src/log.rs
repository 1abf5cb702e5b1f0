//! A one-line-per-event logger on stderr with a global level.

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

#[macro_export]
macro_rules! log_at {
    ($level:expr, $tag:literal, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            eprintln!(
                concat!("{} wspush ", $tag, " {}"),
                $crate::log::timestamp(),
                format_args!($($arg)*)
            );
        }

    };
}

#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::config::LogLevel::Debug, "debug", $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::config::LogLevel::Info, "info", $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::config::LogLevel::Warn, "warn", $($arg)*) }; }
