//! Drawing the [`Model`]: a ratatui screen, and the same content as plain text for a
//! stdout that is not a terminal. Both take their words from the helpers here, so the
//! screen and the snapshot say the same things.

use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row as TableRow, Sparkline, Table},
};

use super::model::{Model, Row, Snapshot};

const COLUMNS: [&str; 7] = [
    "PID",
    "STATUS",
    "LAST BEAT",
    "BEATS",
    "STALLS",
    "EXITS",
    "IDENTITY",
];

/// `datapath=ebpf attest=pidfd`, or what an observer without `varta_datapath_info` is.
fn datapath(s: &Snapshot) -> String {
    match &s.datapath {
        Some(labels) => labels
            .iter()
            .map(|(k, v)| match k.as_str() {
                "mode" => format!("datapath={v}"),
                _ => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => "datapath=? (no varta_datapath_info: the incumbent 0.2.0?)".into(),
    }
}

fn summary(model: &Model, s: &Snapshot) -> String {
    let opt = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0}"));
    let rate = model.beats_per_sec().map_or("-".into(), |r| r.to_string());
    format!(
        "agents tracked {}   beats/s {rate}   stalls {:.0}   exits {:.0}   uptime {}s",
        opt(s.tracked),
        s.total_stalls(),
        s.total_exits(),
        opt(s.uptime)
    )
}

fn drops(s: &Snapshot) -> String {
    let nonzero: Vec<String> = s
        .drops
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(r, n)| format!("{r}={n:.0}"))
        .collect();
    if nonzero.is_empty() {
        "drops: none".into()
    } else {
        format!("drops: {}", nonzero.join(" "))
    }
}

fn cells(r: &Row) -> [String; 7] {
    let age = match r.age {
        Some((s, true)) => format!(">{s:.0}s"),
        // Scraped once a second: finer than that is not known.
        Some((s, false)) if s < 1.0 => "<1s".into(),
        Some((s, false)) => format!("{s:.0}s"),
        None => "-".into(),
    };
    [
        r.pid.to_string(),
        r.status.to_owned(),
        age,
        format!("{:.0}", r.beats),
        format!("{:.0}", r.stalls),
        format!("{:.0}", r.exits),
        r.identity.clone(),
    ]
}

pub fn draw(frame: &mut Frame, model: &Model, addr: SocketAddr, now: Instant) {
    let [head, spark, table, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let mut lines = Vec::new();
    match &model.latest {
        Some(s) => {
            lines.push(Line::from(format!("{addr}  {}", datapath(s))));
            lines.push(Line::from(summary(model, s)));
            lines.push(Line::from(drops(s)));
        }
        None => lines.push(Line::from(format!("{addr}  waiting for the first scrape"))),
    }
    let title = match &model.error {
        Some(e) => format!(" varta-watch top: {e} "),
        None => " varta-watch top ".into(),
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::TOP).title(title)),
        head,
    );

    let rates: Vec<u64> = model.rates.iter().copied().collect();
    // The newest points on the right: as many as fit.
    let fit = rates
        .len()
        .saturating_sub(spark.width.saturating_sub(2) as usize);
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(" beats/s "))
            .data(&rates[fit..])
            .style(Style::default().fg(Color::Green)),
        spark,
    );

    let rows = model.rows(now);
    let widths = [
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Min(10),
    ];
    let table_rows = rows.iter().map(|r| {
        let style = if r.stalled {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else if r.status == "EXITED" {
            Style::default().fg(Color::Yellow)
        } else {
            Style::default()
        };
        TableRow::new(cells(r)).style(style)
    });
    frame.render_widget(
        Table::new(table_rows, widths)
            .header(TableRow::new(COLUMNS).style(Style::default().add_modifier(Modifier::BOLD)))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" agents, stalest first "),
            ),
        table,
    );
    frame.render_widget(Paragraph::new("q quits"), foot);
}

/// One plain snapshot, as `top` prints it to a pipe or a file.
pub fn plain(model: &Model, addr: SocketAddr, now: Instant) -> String {
    let mut out = String::new();
    let Some(s) = &model.latest else {
        return out;
    };
    let _ = writeln!(out, "varta-watch top  {addr}  {}", datapath(s));
    let _ = writeln!(out, "{}", summary(model, s));
    let _ = writeln!(out, "{}", drops(s));
    let _ = writeln!(
        out,
        "{:<8} {:<9} {:<10} {:>9} {:>7} {:>6}  {}",
        COLUMNS[0], COLUMNS[1], COLUMNS[2], COLUMNS[3], COLUMNS[4], COLUMNS[5], COLUMNS[6]
    );
    for r in model.rows(now) {
        let [pid, status, age, beats, stalls, exits, identity] = cells(&r);
        let _ = writeln!(
            out,
            "{pid:<8} {status:<9} {age:<10} {beats:>9} {stalls:>7} {exits:>6}  {identity}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{model::Snapshot, scrape::parse};
    use super::*;

    #[test]
    fn plain_snapshot_names_each_agent_and_its_state() {
        let mut m = Model::default();
        let now = Instant::now();
        m.update(
            Snapshot::from_samples(&parse(
                "varta_datapath_info{mode=\"userspace\"} 1\nvarta_watch_pids_tracked 2\n\
                 varta_beats_total{pid=\"10\"} 5\nvarta_status{pid=\"10\"} 0\n\
                 varta_beats_total{pid=\"11\"} 1\nvarta_status{pid=\"11\"} 3\n\
                 varta_stalls_total{pid=\"11\"} 1\nvarta_frames_dropped_total{reason=\"length\"} 3\n",
            )),
            now,
        );
        let text = plain(&m, "127.0.0.1:9100".parse().unwrap(), now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("datapath=userspace"), "{text}");
        assert!(lines[1].contains("agents tracked 2"), "{text}");
        assert!(lines[1].contains("stalls 1"), "{text}");
        assert_eq!(lines[2], "drops: length=3");
        assert!(
            lines[4].starts_with("11 ") && lines[4].contains("STALLED"),
            "{text}"
        );
        assert!(
            lines[5].starts_with("10 ") && lines[5].contains(" ok "),
            "{text}"
        );
    }
}
