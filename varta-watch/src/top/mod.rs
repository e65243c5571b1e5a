//! `varta-watch top`: a live view of a running observer, read from its /metrics (ours or
//! the incumbent's). ratatui draws it: a maintained TUI crate with the table, sparkline and
//! terminal restore we need, where hand-written escape codes would get resizing and
//! cleanup on panic wrong.

mod model;
mod scrape;
mod view;

use std::{
    io::IsTerminal,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::config::cli::TopArgs;
use model::{Model, Snapshot};

/// How often the view scrapes and redraws.
const PERIOD: Duration = Duration::from_secs(1);

pub fn run(args: &TopArgs) -> Result<()> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let scrape = || -> Result<Snapshot> {
        let body = scrape::fetch(args.addr, token.as_deref())?;
        Ok(Snapshot::from_samples(&scrape::parse(&body)))
    };
    let mut model = Model::default();
    // The first scrape fails loudly: a wrong address or token is a one-line error, not a
    // screen that waits forever.
    model.update(scrape()?, Instant::now());
    if !std::io::stdout().is_terminal() {
        // A second scrape a period later gives the snapshot its beats/s and ages.
        std::thread::sleep(PERIOD);
        model.update(scrape()?, Instant::now());
        print!("{}", view::plain(&model, args.addr, Instant::now()));
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = live(&mut terminal, &mut model, args.addr, &scrape);
    ratatui::restore();
    result
}

fn live(
    terminal: &mut ratatui::DefaultTerminal,
    model: &mut Model,
    addr: SocketAddr,
    scrape: &dyn Fn() -> Result<Snapshot>,
) -> Result<()> {
    let mut next = Instant::now() + PERIOD;
    loop {
        terminal.draw(|f| view::draw(f, model, addr, Instant::now()))?;
        // Keys are read until the next scrape is due.
        while let Some(wait) = next.checked_duration_since(Instant::now()) {
            if event::poll(wait)?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                    return Ok(());
                }
            }
        }
        next += PERIOD;
        match scrape() {
            Ok(snap) => model.update(snap, Instant::now()),
            // The observer may be restarting: say so and keep trying.
            Err(e) => model.error = Some(format!("{e:#}")),
        }
    }
}
