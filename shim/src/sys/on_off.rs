//! A switch in the environment: `on` or `off` (any case, spaces around ignored), on when unset.

/// Whether the switch `name` is on. Anything but `on` or `off` is warned about (naming `what`
/// stays on) and counts as on: a typo never turns a protection off.
pub fn on_unless_off(name: &str, what: &str) -> bool {
    match std::env::var(name) {
        Err(_) => true,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "on" => true,
            "off" => false,
            _ => {
                tracing::warn!("{name}={v:?} is neither on nor off; {what} stays on");
                true
            }
        },
    }
}
