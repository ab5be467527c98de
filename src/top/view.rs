//! Drawing `tine top`'s screen from its state: a header, one row per process with totals,
//! restarts by reason and the accept queues, the recent events, a message line and the keys. On a
//! narrow terminal the least useful columns go first (and the screen says so); below a minimum
//! size only a notice is drawn.

use std::collections::HashMap;
use std::time::Duration;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

use super::status::{Process, Rate, Status};
use super::{Connection, Top};

/// Smallest screen drawn in full.
pub(crate) const MIN_WIDTH: u16 = 32;
pub(crate) const MIN_HEIGHT: u16 = 10;
/// What marks the selected row.
const SELECTED: &str = "> ";

/// A column of the process table.
struct Column {
    title: &'static str,
    width: u16,
    /// Lower goes last when the terminal is narrow (0: always shown).
    keep: u8,
    right: bool,
}

const COLUMNS: [Column; 14] = [
    col("ROLE", 7, 0, false),
    col("NR", 3, 0, true),
    col("PID", 7, 0, true),
    col("GEN", 4, 4, true),
    col("STATE", 10, 0, false),
    col("REQ/S", 8, 1, true),
    col("INFL", 5, 2, true),
    col("CPU%", 6, 1, true),
    col("RSS", 7, 5, true),
    col("PSS", 7, 2, true),
    col("USS", 7, 5, true),
    col("SHR%", 5, 6, true),
    col("AGE", 7, 3, true),
    col("OLDEST REQUEST", 14, 7, false),
];

const fn col(title: &'static str, width: u16, keep: u8, right: bool) -> Column {
    Column {
        title,
        width,
        keep,
        right,
    }
}

/// The columns that fit in `width`, in table order: by importance while they fit.
pub(crate) fn visible_columns(width: u16) -> Vec<usize> {
    let mut order: Vec<usize> = (0..COLUMNS.len()).collect();
    order.sort_by_key(|&i| (COLUMNS[i].keep, i));
    let mut used = SELECTED.len() as u16;
    let mut shown = Vec::new();
    for i in order {
        let need = COLUMNS[i].width + u16::from(!shown.is_empty());
        if used + need > width {
            break;
        }
        used += need;
        shown.push(i);
    }
    shown.sort();
    shown
}

/// KiB as a short human size.
fn size(kb: u64) -> String {
    let kb = kb as f64;
    if kb < 1024.0 {
        format!("{kb:.0}K")
    } else if kb < 1024.0 * 1024.0 {
        format!("{:.1}M", kb / 1024.0)
    } else {
        format!("{:.2}G", kb / 1024.0 / 1024.0)
    }
}

/// A duration as a short text: `850ms`, `12.3s`, `4m05s`, `2h07m`, `3d04h`.
pub(crate) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// The cells of one process row, in [`COLUMNS`] order.
fn cells(p: &Process, r: Option<&Rate>) -> [String; 14] {
    let dash = || "-".to_string();
    [
        p.role.clone(),
        p.nr.map(|n| n.to_string()).unwrap_or_else(dash),
        p.pid.to_string(),
        p.generation.to_string(),
        match &p.profiling {
            Some(prof) => format!("prof {}s", prof.elapsed_ms / 1000),
            None => p.state.clone(),
        },
        match (p.role.as_str(), r) {
            ("worker", Some(r)) => rate(r.requests_per_s),
            _ => dash(),
        },
        if p.role == "worker" {
            p.in_flight.to_string()
        } else {
            dash()
        },
        r.and_then(|r| r.cpu_percent)
            .map(|c| format!("{c:.1}"))
            .unwrap_or_else(dash),
        size(p.rss_kb),
        size(p.pss_kb),
        size(p.uss_kb),
        format!("{:.0}", p.shared_percent),
        p.oldest_request_ms
            .map(|ms| duration(Duration::from_millis(ms)))
            .unwrap_or_else(dash),
        p.oldest_request.clone().unwrap_or_default(),
    ]
}

/// The totals row, in [`COLUMNS`] order.
fn totals(status: &Status, rates: &HashMap<i32, Rate>, total_rate: Option<f64>) -> [String; 14] {
    let procs = &status.processes;
    let cpu: Option<f64> = procs
        .iter()
        .map(|p| rates.get(&p.pid).and_then(|r| r.cpu_percent))
        .sum();
    let oldest = procs.iter().filter_map(|p| p.oldest_request_ms).max();
    [
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        format!("{} procs", procs.len()),
        total_rate.map(rate).unwrap_or_else(|| "-".into()),
        procs.iter().map(|p| p.in_flight).sum::<u64>().to_string(),
        cpu.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
        size(procs.iter().map(|p| p.rss_kb).sum()),
        size(procs.iter().map(|p| p.pss_kb).sum()),
        size(procs.iter().map(|p| p.uss_kb).sum()),
        String::new(),
        oldest
            .map(|ms| duration(Duration::from_millis(ms)))
            .unwrap_or_default(),
        String::new(),
    ]
}

fn row_style(p: &Process) -> Style {
    if p.profiling.is_some() {
        return Style::default().fg(Color::Magenta);
    }
    match p.state.as_str() {
        "busy" => Style::default().fg(Color::Yellow),
        "starting" | "booting" | "promoting" => Style::default().fg(Color::Cyan),
        "retiring" | "stopping" | "draining" => Style::default().fg(Color::DarkGray),
        _ => Style::default(),
    }
}

/// Draws the whole screen.
pub(crate) fn draw(frame: &mut Frame, top: &Top) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let text = format!(
            "tine top: terminal too small ({}x{}), needs {MIN_WIDTH}x{MIN_HEIGHT}. q quits.",
            area.width, area.height
        );
        frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
        return;
    }
    let rows_wanted = top
        .sample
        .as_ref()
        .map(|s| s.status.processes.len() as u16)
        .unwrap_or(0)
        + 2;
    // Header 2, restarts and queues 1 to 3 (wrapped on a narrow terminal), message 1, keys 1;
    // events get what the table leaves, at least a title and two lines when there is room.
    let summary_h = (summary_text(top, area.width).chars().count() as u16)
        .div_ceil(area.width)
        .clamp(1, 3);
    let fixed = 4 + summary_h;
    let events_min = if area.height >= fixed + rows_wanted + 3 {
        3
    } else {
        0
    };
    let table_h = rows_wanted.min(area.height - fixed - events_min).max(1);
    let [header, table, summary, events, message, keys] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(table_h),
        Constraint::Length(summary_h),
        Constraint::Fill(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(frame, top, header);
    draw_table(frame, top, table);
    draw_summary(frame, top, summary);
    draw_events(frame, top, events);
    draw_message(frame, top, message);
    let keys_text = "↑↓ select  +/- workers  r refork  R reload  k kill  p profile  q quit";
    frame.render_widget(
        Paragraph::new(keys_text).style(Style::default().add_modifier(Modifier::DIM)),
        keys,
    );
}

fn draw_header(frame: &mut Frame, top: &Top, area: Rect) {
    let socket = top.socket.display().to_string();
    let mut first = vec![Span::styled(
        "tine top",
        Style::default().add_modifier(Modifier::BOLD),
    )];
    first.push(Span::raw(format!("  {socket}")));
    let second = match (&top.connection, &top.sample) {
        (Connection::Connecting, _) => match top.status_waiting() {
            Some(waited) => Line::from(format!("connecting… (no answer for {})", duration(waited))),
            None => Line::from("connecting…"),
        },
        (Connection::Lost { error, since }, last) => {
            let seen = match last {
                Some(s) => format!(
                    "; showing the last status, from {} ago",
                    duration(s.at.elapsed())
                ),
                None => String::new(),
            };
            let what = if last.is_some() {
                "server went away"
            } else {
                "cannot reach the server"
            };
            // The socket's path is on the line above: the error without it.
            let prefix = format!("cannot connect to {}: ", top.socket.display());
            let error = error.strip_prefix(&prefix).unwrap_or(error);
            Line::from(Span::styled(
                format!(
                    "{what} {} ago, retrying every {}: {error}{seen}",
                    duration(since.elapsed()),
                    duration(top.interval)
                ),
                Style::default()
                    .fg(Color::White)
                    .bg(Color::Red)
                    .add_modifier(Modifier::BOLD),
            ))
        }
        (Connection::Up, Some(s)) => {
            let st = &s.status;
            let workers = st.workers().filter(|p| p.state != "retiring").count();
            let max = st
                .max_workers
                .map(|m| format!(" (max {m})"))
                .unwrap_or_default();
            let generation = st
                .generation
                .map(|g| format!("gen {g}"))
                .unwrap_or_else(|| "gen ?".into());
            let uptime = st
                .processes
                .iter()
                .find(|p| p.role == "monitor")
                .map(|p| format!("up {}", duration(Duration::from_secs(p.uptime_s))))
                .unwrap_or_default();
            let mut text = format!(
                "{generation}  workers {workers}/{}{max}  {uptime}",
                st.target
            );
            if let Some(total) = st.requests_total {
                text.push_str(&format!("  requests {total}"));
            }
            if let Some(reforks) = st.reforks {
                text.push_str(&format!("  reforks {reforks}"));
            }
            if let Some(r) = &st.rollout {
                text.push_str(&format!(
                    "  {} to gen {} {} ({}s{})",
                    r.cause,
                    r.generation,
                    if r.proven { "rolling" } else { "on trial" },
                    r.seconds,
                    if r.failures > 0 {
                        format!(", {} failed", r.failures)
                    } else {
                        String::new()
                    }
                ));
            }
            match top.status_waiting() {
                // The figures stop changing: say why before anyone reads them as current.
                Some(waited) => Line::from(vec![
                    Span::styled(
                        format!("waiting for the server: no answer for {}", duration(waited)),
                        Style::default()
                            .fg(Color::Black)
                            .bg(Color::Yellow)
                            .add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(format!("  {text}")),
                ]),
                None => Line::from(text),
            }
        }
        (Connection::Up, None) => Line::from("connected"),
    };
    frame.render_widget(Paragraph::new(vec![Line::from(first), second]), area);
}

fn draw_table(frame: &mut Frame, top: &Top, area: Rect) {
    let Some(sample) = &top.sample else {
        return;
    };
    let shown = visible_columns(area.width);
    let stale = !matches!(top.connection, Connection::Up);
    let pick = |all: [String; 14]| -> Vec<Cell<'static>> {
        shown
            .iter()
            .map(|&i| {
                let text = all[i].clone();
                let width = COLUMNS[i].width as usize;
                if COLUMNS[i].right && text.len() <= width {
                    Cell::from(format!("{text:>width$}"))
                } else {
                    Cell::from(text)
                }
            })
            .collect()
    };
    let titles: [String; 14] = std::array::from_fn(|i| COLUMNS[i].title.to_string());
    let header = Row::new(pick(titles)).style(Style::default().add_modifier(Modifier::REVERSED));
    let mut rows: Vec<Row> = sample
        .status
        .processes
        .iter()
        .map(|p| {
            let style = if stale {
                Style::default().fg(Color::DarkGray)
            } else {
                row_style(p)
            };
            Row::new(pick(cells(p, top.rates.get(&p.pid)))).style(style)
        })
        .collect();
    rows.push(
        Row::new(pick(totals(&sample.status, &top.rates, top.total_rate)))
            .style(Style::default().add_modifier(Modifier::BOLD)),
    );
    let widths: Vec<Constraint> = shown
        .iter()
        .map(|&i| {
            if COLUMNS[i].title == "OLDEST REQUEST" {
                Constraint::Min(COLUMNS[i].width)
            } else {
                Constraint::Length(COLUMNS[i].width)
            }
        })
        .collect();
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol(SELECTED);
    let mut state = TableState::default().with_selected(top.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

/// The line under the table: hidden columns, accept queues, restarts by reason, the last failed
/// rollout, dropped log lines.
fn summary_text(top: &Top, width: u16) -> String {
    let Some(sample) = &top.sample else {
        return String::new();
    };
    let st = &sample.status;
    let hidden = COLUMNS.len() - visible_columns(width).len();
    let mut parts = Vec::new();
    if hidden > 0 {
        let s = if hidden == 1 { "" } else { "s" };
        parts.push(format!("narrow terminal: {hidden} column{s} hidden"));
    }
    for q in &st.listen_queues {
        let waiting = q
            .waiting
            .map(|w| w.to_string())
            .unwrap_or_else(|| "?".into());
        let limit = q.limit.map(|l| l.to_string()).unwrap_or_else(|| "?".into());
        parts.push(format!("queue {} {waiting}/{limit}", q.listener));
    }
    let restarts: Vec<String> = st
        .restarts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    parts.push(if restarts.is_empty() {
        "restarts: none".to_string()
    } else {
        format!("restarts: {}", restarts.join(", "))
    });
    if let Some(f) = &st.last_failed_rollout {
        parts.push(format!("last failed rollout: {}", f.text));
    }
    if st.log_lines_dropped > 0 {
        parts.push(format!("log lines dropped {}", st.log_lines_dropped));
    }
    parts.join("  ·  ")
}

fn draw_summary(frame: &mut Frame, top: &Top, area: Rect) {
    frame.render_widget(
        Paragraph::new(summary_text(top, area.width)).wrap(Wrap { trim: true }),
        area,
    );
}

fn draw_events(frame: &mut Frame, top: &Top, area: Rect) {
    if area.height == 0 {
        return;
    }
    let Some(sample) = &top.sample else {
        return;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut lines = vec![Line::from(Span::styled(
        "recent events (newest first)",
        Style::default().add_modifier(Modifier::UNDERLINED),
    ))];
    if sample.status.events.is_empty() {
        lines.push(Line::from("none yet"));
    }
    for e in sample.status.events.iter().rev() {
        let ago = duration(Duration::from_millis(now_ms.saturating_sub(e.unix_ms)));
        let style = match e.kind.as_str() {
            "kill" | "died" | "timeout" => Style::default().fg(Color::Red),
            "rollout" if e.text.contains("abandoned") => Style::default().fg(Color::Red),
            "recycle" => Style::default().fg(Color::Yellow),
            _ => Style::default(),
        };
        lines.push(Line::from(vec![
            Span::raw(format!("{ago:>7} ago  ")),
            Span::styled(format!("{:<8}", e.kind), style),
            Span::raw(e.text.clone()),
        ]));
        if lines.len() >= area.height as usize {
            break;
        }
    }
    frame.render_widget(Paragraph::new(lines), area);
}

fn draw_message(frame: &mut Frame, top: &Top, area: Rect) {
    let (text, style) = if let Some(confirm) = &top.confirm {
        (
            format!("{} y/n", confirm.prompt),
            Style::default()
                .fg(Color::Black)
                .bg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        )
    } else if let Some(m) = &top.message {
        let style = if m.error {
            Style::default().fg(Color::Red)
        } else {
            Style::default().fg(Color::Green)
        };
        (m.text.clone(), style)
    } else if !top.pending.is_empty() {
        (
            format!("waiting: {}", top.pending.join(", ")),
            Style::default().fg(Color::Cyan),
        )
    } else {
        (String::new(), Style::default())
    };
    frame.render_widget(Paragraph::new(text).style(style), area);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_terminals_keep_the_identity_columns_first() {
        let all = visible_columns(200);
        assert_eq!(all.len(), COLUMNS.len());
        let narrow: Vec<&str> = visible_columns(50)
            .iter()
            .map(|&i| COLUMNS[i].title)
            .collect();
        assert_eq!(narrow, ["ROLE", "NR", "PID", "STATE", "REQ/S", "CPU%"]);
        let tiny: Vec<&str> = visible_columns(MIN_WIDTH)
            .iter()
            .map(|&i| COLUMNS[i].title)
            .collect();
        assert_eq!(tiny, ["ROLE", "NR", "PID", "STATE"]);
    }

    #[test]
    fn sizes_and_durations_are_short() {
        assert_eq!(size(512), "512K");
        assert_eq!(size(1536), "1.5M");
        assert_eq!(size(3 * 1024 * 1024), "3.00G");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(7620)), "2h07m");
    }
}
