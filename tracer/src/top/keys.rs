//! Key input for `tracer top`, read straight from the terminal: a
//! level-triggered `poll()` with a timeout, then the bytes parsed into the
//! keys the view knows. A hung-up terminal is noticed, never spun on.

use std::time::Duration;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

pub enum Input {
    /// Nothing within the timeout (or a signal interrupted the wait).
    Idle,
    Bytes(Vec<u8>),
    /// The terminal is gone.
    HungUp,
}

/// Waits up to `timeout` for input on `fd` and reads what is there.
pub fn wait(fd: libc::c_int, timeout: Duration) -> Input {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&raw mut p, 1, ms) };
    if n <= 0 {
        return Input::Idle;
    }
    if p.revents & libc::POLLIN == 0 {
        return if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            Input::HungUp
        } else {
            Input::Idle
        };
    }
    let mut buf = [0u8; 256];
    // SAFETY: reads at most buf.len() bytes into buf; poll said the
    // descriptor is readable, so this does not block.
    let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    match usize::try_from(got) {
        // End of file: the terminal hung up.
        Ok(0) => Input::HungUp,
        Ok(n) => Input::Bytes(buf[..n].to_vec()),
        Err(_) => {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) {
                Input::Idle
            } else {
                Input::HungUp
            }
        }
    }
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

/// The keys in a burst of terminal input (xterm-style sequences). Bytes
/// that mean nothing here are dropped.
pub fn parse(bytes: &[u8]) -> Vec<KeyEvent> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        match b {
            0x1b => {
                // CSI / SS3 sequences: ESC [ … final, ESC O final.
                let intro = bytes.get(i).copied();
                if !matches!(intro, Some(b'[' | b'O')) {
                    if intro.is_none() {
                        out.push(key(KeyCode::Esc));
                    } else {
                        // Alt+key: not used; skip the key.
                        i += 1;
                    }
                    continue;
                }
                i += 1;
                let start = i;
                while i < bytes.len() && !(0x40..=0x7e).contains(&bytes[i]) {
                    i += 1;
                }
                let Some(&fin) = bytes.get(i) else {
                    break;
                };
                i += 1;
                let params = &bytes[start..i - 1];
                let code = match (fin, params) {
                    (b'A', _) => Some(KeyCode::Up),
                    (b'B', _) => Some(KeyCode::Down),
                    (b'C', _) => Some(KeyCode::Right),
                    (b'D', _) => Some(KeyCode::Left),
                    (b'H', _) | (b'~', b"1" | b"7") => Some(KeyCode::Home),
                    (b'F', _) | (b'~', b"4" | b"8") => Some(KeyCode::End),
                    (b'~', b"5") => Some(KeyCode::PageUp),
                    (b'~', b"6") => Some(KeyCode::PageDown),
                    _ => None,
                };
                out.extend(code.map(key));
            }
            b'\r' | b'\n' => out.push(key(KeyCode::Enter)),
            0x7f | 0x08 => out.push(key(KeyCode::Backspace)),
            b'\t' => out.push(key(KeyCode::Tab)),
            0x03 => out.push(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            0x20..=0x7e => out.push(key(KeyCode::Char(char::from(b)))),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_sequences() {
        let codes: Vec<KeyCode> =
            parse(b"q/4003\r\x1b[A\x1b[B\x1bOA\x1b[5~\x1b[6~\x1b[H\x1b[4~\x7f")
                .into_iter()
                .map(|k| k.code)
                .collect();
        assert_eq!(
            codes,
            [
                KeyCode::Char('q'),
                KeyCode::Char('/'),
                KeyCode::Char('4'),
                KeyCode::Char('0'),
                KeyCode::Char('0'),
                KeyCode::Char('3'),
                KeyCode::Enter,
                KeyCode::Up,
                KeyCode::Down,
                KeyCode::Up,
                KeyCode::PageUp,
                KeyCode::PageDown,
                KeyCode::Home,
                KeyCode::End,
                KeyCode::Backspace,
            ]
        );
        assert_eq!(parse(b"\x1b")[0].code, KeyCode::Esc);
        assert_eq!(parse(b"\x03")[0].modifiers, KeyModifiers::CONTROL);
        // Alt+x, a cut sequence and unknown bytes are dropped.
        assert!(parse(b"\x1bx\x01\x1b[").is_empty());
    }
}
