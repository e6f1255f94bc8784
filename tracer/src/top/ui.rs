//! Draws [`TopState`]: header, VM table, the selected VM's vCPUs, findings,
//! and a key line. Any terminal size works; below the minimum it says so.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState, Wrap},
};

use common::INVALID_PAGE;

use super::state::{TopState, VmRow, root_text};
use crate::detector::Severity;

/// Below this the screen only says it is too small.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 16;

pub fn draw(f: &mut Frame, s: &TopState) {
    let area = f.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let msg = format!(
            "tracer top: the terminal is {}x{}; it needs {MIN_WIDTH}x{MIN_HEIGHT}. q quits.",
            area.width, area.height
        );
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, vms, vcpus, findings, keys] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Percentage(30),
        Constraint::Percentage(30),
        Constraint::Min(6),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(f, s, header);
    let visible = s.visible();
    let selected = s.selected_index(&visible);
    draw_vms(f, s, &visible, selected, vms);
    draw_vcpus(f, selected.map(|i| &visible[i]), s.now_ns, vcpus);
    draw_findings(f, s, findings);
    draw_keys(f, s, keys);
}

fn draw_header(f: &mut Frame, s: &TopState, area: Rect) {
    let (vms, tdx, vcpus) = s.counts();
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut state = vec![
        Span::styled("events ", bold),
        Span::raw(format!("{} ({:.0}/s)  ", s.events, s.events_per_s)),
        Span::styled("drops ", bold),
        Span::styled(
            format!("{}  ", s.drops),
            if s.drops > 0 {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            },
        ),
        Span::styled("findings ", bold),
        Span::styled(
            format!("{} ({} critical)  ", s.findings_total, s.critical_total),
            if s.critical_total > 0 {
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
            } else {
                Style::default()
            },
        ),
        Span::styled("VMs ", bold),
        Span::raw(format!("{vms} ({tdx} TDX)  ")),
        Span::styled("vCPUs ", bold),
        Span::raw(format!("{vcpus}")),
    ];
    if let Some(speed) = s.speed {
        state.push(Span::raw(format!(
            "  [{}{speed}x]",
            if s.paused { "paused, " } else { "" }
        )));
    }
    if !s.status.is_empty() {
        state.push(Span::styled(
            format!("  [{}]", s.status),
            Style::default().fg(Color::Yellow),
        ));
    }
    let lines = vec![
        Line::from(vec![
            Span::styled("tracer top", bold),
            Span::raw(format!(
                "  host {}  kernel {}  {}",
                s.host, s.kernel, s.source
            )),
        ]),
        Line::from(format!("plan: {}", s.plan_summary)),
        Line::from(state),
    ];
    f.render_widget(Paragraph::new(lines), area);
}

fn draw_vms(f: &mut Frame, s: &TopState, visible: &[VmRow], selected: Option<usize>, area: Rect) {
    let arrow = if s.reverse { "▲" } else { "▼" };
    let head = |name: &str, key: &str| {
        if s.sort.name() == key {
            format!("{name}{arrow}")
        } else {
            name.to_owned()
        }
    };
    let header = Row::new(vec![
        head("VMM PID", "pid"),
        head("TYPE", "type"),
        head("VCPUS", "vcpus"),
        head("LOADS/S", "loads/s"),
        head("ZAPS/S", "zaps/s"),
        head("FINDINGS", "findings"),
        "KVM".to_owned(),
        "NAME".to_owned(),
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = visible.iter().map(|vm| {
        let style = if vm.vm.findings > 0 {
            Style::default().fg(Color::Red)
        } else if vm.is_tdx() {
            Style::default().fg(Color::Cyan)
        } else {
            Style::default()
        };
        Row::new(vec![
            vm.vm.userspace_pid.map_or("?".into(), |p| p.to_string()),
            vm.type_name().to_owned(),
            vm.vcpus.len().to_string(),
            format!("{:.1}", vm.loads_per_s),
            format!("{:.1}", vm.zaps_per_s),
            vm.vm.findings.to_string(),
            format!("{:#x}", vm.vm.kvm),
            s.vm_name(vm).unwrap_or("-").to_owned(),
        ])
        .style(style)
    });
    let title = if s.editing_filter {
        format!(" VMs — filter: {}█ ", s.filter)
    } else if s.filter.is_empty() {
        format!(
            " VMs ({}) — sort: {} {arrow} ",
            visible.len(),
            s.sort.name()
        )
    } else {
        format!(
            " VMs ({} of {}) — filter: {} — sort: {} {arrow} ",
            visible.len(),
            s.counts().0,
            s.filter,
            s.sort.name()
        )
    };
    let table = Table::new(
        rows,
        [
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(19),
            Constraint::Min(8),
        ],
    )
    .header(header)
    .block(Block::default().borders(Borders::TOP).title(title))
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
    if visible.is_empty() {
        let msg = if s.counts().0 == 0 {
            "no VM seen yet"
        } else {
            "no VM matches the filter (Esc clears it)"
        };
        f.render_widget(
            Paragraph::new(msg).block(Block::default().borders(Borders::TOP).title(" VMs ")),
            area,
        );
        return;
    }
    let mut ts = TableState::default().with_selected(selected);
    f.render_stateful_widget(table, area, &mut ts);
}

#[expect(clippy::cast_precision_loss, reason = "ages for display")]
fn draw_vcpus(f: &mut Frame, vm: Option<&VmRow>, now_ns: u64, area: Rect) {
    let Some(vm) = vm else {
        f.render_widget(
            Block::default().borders(Borders::TOP).title(" vCPUs "),
            area,
        );
        return;
    };
    let header = Row::new(vec![
        "VCPU",
        "DIRECT ROOT",
        "MIRROR ROOT",
        "LAST LOAD",
        "GEN",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let mut vcpus: Vec<_> = vm.vcpus.iter().collect();
    vcpus.sort_by_key(|v| (v.vcpu_id, v.vcpu));
    let rows = vcpus.into_iter().map(|v| {
        let forbidden = vm.is_tdx()
            && v.root_hpa.is_some_and(|h| h != INVALID_PAGE)
            && v.mirror_root_hpa == Some(INVALID_PAGE);
        let load = v.last_load.map_or("-".into(), |(ts, ret)| {
            let age = now_ns.saturating_sub(ts) as f64 / 1e9;
            if ret == 0 {
                format!("{age:.1}s ago, ok")
            } else {
                format!(
                    "{age:.1}s ago, {ret} ({})",
                    crate::detector::errno_name(ret)
                )
            }
        });
        let mirror = Cell::from(root_text(v.mirror_root_hpa)).style(if forbidden {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        });
        Row::new(vec![
            Cell::from(v.vcpu_id.map_or("?".into(), |i| i.to_string())),
            Cell::from(root_text(v.root_hpa)),
            mirror,
            Cell::from(load),
            Cell::from(v.mmu_valid_gen.map_or("-".into(), |g| g.to_string())),
        ])
    });
    let title = format!(
        " vCPUs of VMM {} ({}, {} vCPUs{}) ",
        vm.vm.userspace_pid.map_or("?".into(), |p| p.to_string()),
        vm.type_name(),
        vm.vcpus.len(),
        vm.vm
            .mmu_valid_gen
            .map_or(String::new(), |g| format!(", mmu_valid_gen {g}"))
    );
    let table = Table::new(
        rows,
        [
            Constraint::Length(5),
            Constraint::Length(22),
            Constraint::Length(22),
            Constraint::Length(24),
            Constraint::Length(4),
        ],
    )
    .header(header)
    .block(Block::default().borders(Borders::TOP).title(title));
    f.render_widget(table, area);
}

/// One line per finding, newest first, and below them the newest
/// finding's whole explanation.
#[expect(clippy::cast_precision_loss, reason = "ages for display")]
fn draw_findings(f: &mut Frame, s: &TopState, area: Rect) {
    let title = format!(" Findings ({}, newest first) ", s.findings_total);
    let block = Block::default().borders(Borders::TOP).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(newest) = s.findings.front() else {
        f.render_widget(Paragraph::new("none"), inner);
        return;
    };
    let detail_height = (inner.height / 2).clamp(1, 4);
    let [list, detail] =
        Layout::vertical([Constraint::Min(1), Constraint::Length(detail_height)]).areas(inner);
    // Worst kinds first, so a critical one never scrolls out of sight.
    let mut kinds: Vec<_> = s.by_kind.iter().collect();
    kinds.sort_by_key(|(k, n)| (std::cmp::Reverse(k.severity()), std::cmp::Reverse(**n)));
    let mut summary = vec![Span::raw("by kind: ")];
    for (k, n) in kinds {
        summary.push(Span::styled(
            format!("{} ×{n}  ", k.name()),
            Style::default().fg(severity_color(k.severity())),
        ));
    }
    let mut lines = vec![Line::from(summary)];
    lines.extend(s.findings.iter().take(usize::from(list.height)).map(|x| {
        let color = severity_color(x.severity);
        let age = s.now_ns.saturating_sub(x.ts_ns) as f64 / 1e9;
        Line::from(vec![
            Span::raw(format!("{age:>7.1}s ago ")),
            Span::styled(
                format!("{:<8} {:<36} ", x.severity.name(), x.kind.name()),
                Style::default().fg(color).add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                "vmm={} vcpu={}",
                x.userspace_pid.map_or("?".into(), |p| p.to_string()),
                x.vcpu_id.map_or("-".into(), |i| i.to_string()),
            )),
        ])
    }));
    f.render_widget(Paragraph::new(lines), list);
    f.render_widget(
        Paragraph::new(format!("newest: {}", newest.explanation))
            .style(Style::default().add_modifier(Modifier::DIM))
            .wrap(Wrap { trim: true }),
        detail,
    );
}

fn severity_color(s: Severity) -> Color {
    match s {
        Severity::Critical | Severity::Error => Color::Red,
        Severity::Warning => Color::Yellow,
        Severity::Info => Color::Reset,
    }
}

fn draw_keys(f: &mut Frame, s: &TopState, area: Rect) {
    let mut keys = "q quit  ↑↓ select  s sort  r reverse  / filter".to_owned();
    if s.speed.is_some() {
        keys.push_str("  space pause  +/- speed");
    }
    f.render_widget(
        Paragraph::new(keys).style(Style::default().add_modifier(Modifier::REVERSED)),
        area,
    );
}
