//! What `tracer top` shows, built from events: per-VM and per-vCPU rows,
//! rates, the latest findings, and the view's own state (selection, sort,
//! filter). Pure: no terminal, no clock; event timestamps and the `now_ns`
//! given to [`TopState::tick`] are its clock, so live and replayed runs and
//! the tests share it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use common::{INVALID_PAGE, KVM_X86_TDX_VM};

use crate::{
    detector::{Detector, DetectorConfig, Finding, FindingKind, Severity, VmView},
    event::{Event, vm_type_name},
};

/// Findings kept for the findings pane.
const FINDINGS_KEPT: usize = 200;

pub use crate::detector::VcpuView as VcpuRow;

/// One VM's row: the detector's view of it, its vCPUs, and the rates `top`
/// computes.
#[derive(Clone, Debug)]
pub struct VmRow {
    pub vm: VmView,
    pub vcpus: Vec<VcpuRow>,
    pub loads_per_s: f64,
    pub zaps_per_s: f64,
}

impl VmRow {
    pub fn is_tdx(&self) -> bool {
        self.vm.vm_type == Some(KVM_X86_TDX_VM)
    }

    pub fn type_name(&self) -> &'static str {
        self.vm.vm_type.map_or("?", vm_type_name)
    }
}

/// A VM's counters at the last tick and the rates computed then.
#[derive(Clone, Copy, Debug, Default)]
struct Rates {
    loads_at_tick: u64,
    zaps_at_tick: u64,
    loads_per_s: f64,
    zaps_per_s: f64,
}

/// The VM table's sort columns, in the order `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Findings,
    ZapsPerS,
    LoadsPerS,
    Vcpus,
    Pid,
    Type,
}

impl SortKey {
    const ORDER: [Self; 6] = [
        Self::Findings,
        Self::ZapsPerS,
        Self::LoadsPerS,
        Self::Vcpus,
        Self::Pid,
        Self::Type,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Findings => "findings",
            Self::ZapsPerS => "zaps/s",
            Self::LoadsPerS => "loads/s",
            Self::Vcpus => "vcpus",
            Self::Pid => "pid",
            Self::Type => "type",
        }
    }

    fn next(self) -> Self {
        let i = Self::ORDER.iter().position(|k| *k == self).unwrap_or(0);
        Self::ORDER[(i + 1) % Self::ORDER.len()]
    }
}

/// What a key asks of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    TogglePause,
    Faster,
    Slower,
}

/// Everything on screen.
pub struct TopState {
    /// Header facts: host, kernel, where events come from, the plan.
    pub host: String,
    pub kernel: String,
    pub source: String,
    pub plan_summary: String,
    /// Per-VM rates, for the VMs the detector tracks (pruned at each tick).
    rates: HashMap<u64, Rates>,
    /// VMMs' names: read from `/proc` live, from `vm` records in a replay.
    pub names: crate::vmid::VmNames,
    /// Newest first.
    pub findings: VecDeque<Finding>,
    pub events: u64,
    pub findings_total: u64,
    pub critical_total: u64,
    /// Findings by kind since the start.
    pub by_kind: BTreeMap<FindingKind, u64>,
    /// Events lost (ring buffer full, or recorded as lost in a log).
    pub drops: u64,
    pub events_per_s: f64,
    events_at_tick: u64,
    last_tick_ns: Option<u64>,
    /// The newest event time seen.
    pub now_ns: u64,
    pub sort: SortKey,
    /// Ascending instead of descending.
    pub reverse: bool,
    pub filter: String,
    /// `/` was pressed: keys go to the filter.
    pub editing_filter: bool,
    /// The selected VM, by `struct kvm *`.
    pub selected: Option<u64>,
    /// Replay: paused, speed, and a status such as "end of log".
    pub paused: bool,
    pub speed: Option<f64>,
    pub status: String,
    detector: Detector,
    scratch: Vec<Finding>,
}

impl TopState {
    pub fn new(host: String, kernel: String, source: String, plan_summary: String) -> Self {
        Self {
            host,
            kernel,
            source,
            plan_summary,
            rates: HashMap::new(),
            findings: VecDeque::new(),
            events: 0,
            findings_total: 0,
            critical_total: 0,
            by_kind: BTreeMap::new(),
            drops: 0,
            events_per_s: 0.0,
            events_at_tick: 0,
            last_tick_ns: None,
            now_ns: 0,
            sort: SortKey::Findings,
            reverse: false,
            filter: String::new(),
            editing_filter: false,
            selected: None,
            paused: false,
            speed: None,
            status: String::new(),
            detector: Detector::new(DetectorConfig::default()),
            scratch: Vec::new(),
            names: crate::vmid::VmNames::default(),
        }
    }

    /// The VM's name (QEMU `-name`, libvirt domain or uuid), when known.
    pub fn vm_name(&self, vm: &VmRow) -> Option<&str> {
        self.names.get(vm.vm.userspace_pid)?.display_name()
    }

    /// Takes one event: the detector's state and findings, the counters.
    pub fn event(&mut self, ev: &Event) {
        self.events += 1;
        self.now_ns = self.now_ns.max(ev.ts_ns);
        if let Some(pid) = ev.userspace_pid {
            self.names.observe(pid, ev.ts_ns);
        }
        self.detector.observe(ev, &mut self.scratch);
        for mut f in std::mem::take(&mut self.scratch) {
            f.vm = self.names.get(f.userspace_pid).cloned();
            self.finding(f);
        }
    }

    fn finding(&mut self, f: Finding) {
        self.findings_total += 1;
        *self.by_kind.entry(f.kind).or_default() += 1;
        if f.severity == Severity::Critical {
            self.critical_total += 1;
        }
        self.findings.push_front(f);
        self.findings.truncate(FINDINGS_KEPT);
    }

    /// The VMs the detector tracks, as rows, by `struct kvm *`.
    pub fn vms(&self) -> BTreeMap<u64, VmRow> {
        self.detector.vms().map(|v| (v.kvm, self.row(v))).collect()
    }

    fn row(&self, v: VmView) -> VmRow {
        let r = self.rates.get(&v.kvm).copied().unwrap_or_default();
        VmRow {
            vm: v,
            vcpus: self.detector.vcpus_of(v.kvm).collect(),
            loads_per_s: r.loads_per_s,
            zaps_per_s: r.zaps_per_s,
        }
    }

    /// VMs tracked, TDX VMs among them, and vCPUs tracked.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.detector.tracked_vms(),
            self.detector.tdx_vms(),
            self.detector.tracked_vcpus(),
        )
    }

    /// Recomputes the rates over the time since the last tick.
    #[expect(clippy::cast_precision_loss, reason = "rates for display")]
    pub fn tick(&mut self, now_ns: u64) {
        let secs = match self.last_tick_ns {
            Some(last) if now_ns <= last => return,
            Some(last) => Some((now_ns - last) as f64 / 1e9),
            None => None,
        };
        let per_s = |now: u64, then: u64| secs.map_or(0.0, |s| (now - then.min(now)) as f64 / s);
        if secs.is_some() {
            self.events_per_s = per_s(self.events, self.events_at_tick);
        }
        // Rebuilt from the detector's VMs: a VM it dropped loses its rates.
        self.rates = self
            .detector
            .vms()
            .map(|v| {
                let old = self.rates.get(&v.kvm).copied().unwrap_or_default();
                let r = Rates {
                    loads_at_tick: v.loads,
                    zaps_at_tick: v.zaps,
                    loads_per_s: per_s(v.loads, old.loads_at_tick),
                    zaps_per_s: per_s(v.zaps, old.zaps_at_tick),
                };
                (v.kvm, r)
            })
            .collect();
        self.last_tick_ns = Some(now_ns);
        self.events_at_tick = self.events;
    }

    /// The VMs the table shows: filtered, then sorted.
    pub fn visible(&self) -> Vec<VmRow> {
        let needle = self.filter.to_lowercase();
        let mut rows: Vec<VmRow> = self
            .detector
            .vms()
            .map(|v| self.row(v))
            .filter(|vm| {
                needle.is_empty()
                    || vm
                        .vm
                        .userspace_pid
                        .is_some_and(|p| p.to_string().contains(&needle))
                    || vm.type_name().contains(&needle)
                    || format!("{:#x}", vm.vm.kvm).contains(&needle)
            })
            .collect();
        let key = self.sort;
        rows.sort_by(|a, b| {
            let ord = match key {
                SortKey::Findings => a.vm.findings.cmp(&b.vm.findings),
                SortKey::ZapsPerS => a.zaps_per_s.total_cmp(&b.zaps_per_s),
                SortKey::LoadsPerS => a.loads_per_s.total_cmp(&b.loads_per_s),
                SortKey::Vcpus => a.vcpus.len().cmp(&b.vcpus.len()),
                SortKey::Pid => a.vm.userspace_pid.cmp(&b.vm.userspace_pid),
                SortKey::Type => a.vm.vm_type.cmp(&b.vm.vm_type),
            }
            .then(a.vm.userspace_pid.cmp(&b.vm.userspace_pid))
            .then(a.vm.kvm.cmp(&b.vm.kvm));
            // Descending by default, as in top; `r` flips it.
            if self.reverse { ord } else { ord.reverse() }
        });
        rows
    }

    /// The selected VM among the visible ones (the first if none is).
    pub fn selected_index(&self, visible: &[VmRow]) -> Option<usize> {
        if visible.is_empty() {
            return None;
        }
        Some(
            self.selected
                .and_then(|k| visible.iter().position(|v| v.vm.kvm == k))
                .unwrap_or(0),
        )
    }

    fn move_selection(&mut self, delta: isize) {
        let visible = self.visible();
        let Some(i) = self.selected_index(&visible) else {
            return;
        };
        let last = visible.len() - 1;
        let j = i.saturating_add_signed(delta).min(last);
        self.selected = Some(visible[j].vm.kvm);
    }

    /// Handles one key press.
    pub fn key(&mut self, k: KeyEvent) -> Action {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.editing_filter {
            match k.code {
                KeyCode::Enter => self.editing_filter = false,
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if self.filter.len() < 32 => self.filter.push(c),
                _ => {}
            }
            return Action::None;
        }
        match k.code {
            KeyCode::Esc if !self.filter.is_empty() => self.filter.clear(),
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::Home => self.move_selection(isize::MIN / 2),
            KeyCode::End => self.move_selection(isize::MAX / 2),
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Char(' ') => return Action::TogglePause,
            KeyCode::Char('+' | '=') => return Action::Faster,
            KeyCode::Char('-') => return Action::Slower,
            _ => {}
        }
        Action::None
    }
}

/// A root as the vCPU pane shows it.
pub fn root_text(hpa: Option<u64>) -> String {
    match hpa {
        None => "-".into(),
        Some(INVALID_PAGE) => "INVALID".into(),
        Some(h) => format!("valid {h:#x}"),
    }
}
