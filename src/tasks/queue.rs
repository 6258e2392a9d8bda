//! The dispatcher's in-memory queue of tasks waiting for an agent, by capability. It holds ids
//! only; the records stay with the dispatcher, which rebuilds the queue from the `acc_tasks`
//! bucket when it takes over.
//!
//! Order today: priority (1 first), then first in, first out. Issue 16 (aging between
//! priority levels, round-robin across tenants within a level) changes only this type: the
//! dispatcher calls [`TaskQueue::push`] and [`TaskQueue::pop_for`] and nothing else decides
//! order.

use std::collections::{BTreeMap, HashMap};

use crate::domain::TaskId;

/// A task waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub task_id: TaskId,
    pub capability: String,
    pub priority: u8,
}

/// Position in a capability's line: priority, then arrival.
type Position = (u8, u64);

#[derive(Debug, Default)]
pub struct TaskQueue {
    lines: HashMap<String, BTreeMap<Position, TaskId>>,
    index: HashMap<TaskId, (String, Position)>,
    arrivals: u64,
}

impl TaskQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a task behind those of its priority; a task already queued keeps its place.
    pub fn push(&mut self, task: Waiting) {
        if self.index.contains_key(&task.task_id) {
            return;
        }
        self.arrivals += 1;
        let position = (task.priority, self.arrivals);
        self.lines
            .entry(task.capability.clone())
            .or_default()
            .insert(position, task.task_id.clone());
        self.index.insert(task.task_id, (task.capability, position));
    }

    /// Takes a task out of the queue (cancelled, or taken by another path); true if it was in.
    pub fn remove(&mut self, task_id: &TaskId) -> bool {
        let Some((capability, position)) = self.index.remove(task_id) else {
            return false;
        };
        if let Some(line) = self.lines.get_mut(&capability) {
            line.remove(&position);
            if line.is_empty() {
                self.lines.remove(&capability);
            }
        }
        true
    }

    /// The first task, in queue order, of any of `capabilities` that `accept` takes (the
    /// dispatcher refuses, for example, a retry to an agent that failed it when another agent
    /// could take it), removed from the queue.
    pub fn pop_for(
        &mut self,
        capabilities: &[String],
        mut accept: impl FnMut(&TaskId) -> bool,
    ) -> Option<Waiting> {
        let mut best: Option<(Position, &String, TaskId)> = None;
        for capability in capabilities {
            let Some(line) = self.lines.get(capability) else {
                continue;
            };
            let first = line
                .iter()
                .take_while(|(position, _)| best.as_ref().is_none_or(|(b, _, _)| *position < b))
                .find(|(_, task_id)| accept(task_id));
            if let Some((position, task_id)) = first {
                best = Some((*position, capability, task_id.clone()));
            }
        }
        let (position, capability, task_id) = best?;
        let waiting = Waiting {
            task_id,
            capability: capability.clone(),
            priority: position.0,
        };
        self.remove(&waiting.task_id);
        Some(waiting)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Queued tasks by capability and priority, for `/metrics`.
    pub fn depth(&self) -> BTreeMap<(String, u8), usize> {
        let mut depth = BTreeMap::new();
        for (capability, (priority, _)) in self.index.values() {
            *depth.entry((capability.clone(), *priority)).or_default() += 1;
        }
        depth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(id: &str, capability: &str, priority: u8) -> Waiting {
        Waiting {
            task_id: TaskId::parse(id).unwrap(),
            capability: capability.into(),
            priority,
        }
    }

    fn caps(list: &[&str]) -> Vec<String> {
        list.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn tasks_leave_by_priority_then_in_arrival_order_for_the_asked_capabilities() {
        let mut queue = TaskQueue::new();
        queue.push(waiting("a", "x", 3));
        queue.push(waiting("b", "y", 1));
        queue.push(waiting("c", "x", 1));
        queue.push(waiting("d", "x", 3));
        queue.push(waiting("a", "x", 3));
        assert_eq!(queue.len(), 4);
        let ids = |queue: &mut TaskQueue, caps: &[String]| {
            std::iter::from_fn(|| queue.pop_for(caps, |_| true))
                .map(|w| w.task_id.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&mut queue, &caps(&["x"])), ["c", "a", "d"]);
        assert_eq!(ids(&mut queue, &caps(&["z"])), Vec::<String>::new());
        assert_eq!(ids(&mut queue, &caps(&["x", "y"])), ["b"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_task_the_caller_refuses_stays_queued_for_another() {
        let mut queue = TaskQueue::new();
        queue.push(waiting("a", "x", 1));
        queue.push(waiting("b", "x", 2));
        let taken = queue
            .pop_for(&caps(&["x"]), |id| id.as_str() != "a")
            .unwrap();
        assert_eq!(taken.task_id.as_str(), "b");
        assert_eq!(queue.depth().get(&("x".into(), 1)), Some(&1));
        assert!(queue.remove(&TaskId::parse("a").unwrap()));
        assert!(!queue.remove(&TaskId::parse("a").unwrap()));
    }
}
