//! `--filter=NAME` on the command line: which filters, which parameters each gets, and the
//! stack they make over the plugin.
//!
//! nbdkit's rules, decided here once for `sluice serve` and the `nbdkit` name alike: filters
//! are given outermost first (`--filter=a --filter=b plugin` puts `a` over `b` over the
//! plugin); each `key=value` goes to the first filter, outermost first, that owns the key,
//! and everything else (bare values included) to the plugin, in the order given. The
//! registry ([`sluice_block::filters`]) says which keys a filter owns and builds it.

use std::sync::Arc;

use sluice_block::filters::{self, FilterEnv, FilterSpec};
use sluice_block::plugins::ConfigArg;
use sluice_block::{Errno, Handle, OpenContext, Plugin, ThreadModel};

/// The filters asked for, outermost first, each with its parameters.
pub struct Chosen {
    pub filters: Vec<(&'static FilterSpec, Vec<ConfigArg>)>,
}

/// A filter sluice does not have: the one-line message for the user.
#[derive(Debug)]
pub struct UnknownFilter(String);

impl std::fmt::Display for UnknownFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnknownFilter {}

/// Looks the names up and splits `params` between the filters and the plugin (see the module
/// doc). Returns the filters and the plugin's parameters.
pub fn route(
    names: &[String],
    params: Vec<ConfigArg>,
) -> Result<(Chosen, Vec<ConfigArg>), UnknownFilter> {
    let mut filters = Vec::with_capacity(names.len());
    for name in names {
        filters.push((find(name)?, Vec::new()));
    }
    let mut plugin = Vec::new();
    for p in params {
        let owner = p
            .key
            .as_deref()
            .and_then(|k| filters.iter_mut().find(|(spec, _)| spec.keys.contains(&k)));
        match owner {
            Some((_, mine)) => mine.push(p),
            None => plugin.push(p),
        }
    }
    Ok((Chosen { filters }, plugin))
}

fn find(name: &str) -> Result<&'static FilterSpec, UnknownFilter> {
    let list = || {
        filters::all()
            .iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    filters::find(name).ok_or_else(|| {
        UnknownFilter(if name.contains('/') || name.ends_with(".so") {
            format!(
                "--filter={name}: sluice cannot load nbdkit's C filters (their interface is \
                 nbdkit's internals); it has its own filters of the same names: {}",
                list()
            )
        } else {
            format!("unknown filter '{name}' (sluice's filters are: {})", list())
        })
    })
}

impl Chosen {
    /// Puts the filters over `plugin`, innermost first, so that the first given is outermost.
    /// A bad parameter is an EINVAL error naming the filter and the key.
    pub fn stack(
        &self,
        plugin: Arc<dyn Plugin>,
        env: &FilterEnv,
    ) -> sluice_block::Result<Arc<dyn Plugin>> {
        self.filters
            .iter()
            .rev()
            .try_fold(plugin, |inner, (spec, params)| {
                (spec.open)(params, inner, env)
            })
    }

    /// The strictest thread model of the filters alone (for `--dump-plugin`, which describes
    /// the plugin without loading the filters' files or sockets: only their parameters are
    /// checked, as nbdkit's `.config`).
    pub fn thread_model(&self) -> sluice_block::Result<ThreadModel> {
        Ok(self
            .stack(Arc::new(Nothing), &FilterEnv::default())?
            .thread_model())
    }
}

/// The plugin under a stack built only to be described: it can serve nothing.
struct Nothing;

impl Plugin for Nothing {
    fn name(&self) -> &str {
        "nothing"
    }
    fn open(&self, _ctx: &OpenContext<'_>) -> sluice_block::Result<Box<dyn Handle>> {
        Err(sluice_block::BlockError::new(
            Errno::EINVAL,
            "this stack only describes its filters",
        ))
    }
}

/// Replaces the `thread_model=` line of a `--dump-plugin` text with the stack's: the
/// strictest of the plugin's and the filters' (nbdkit prints the plugin's dump with the
/// thread model the whole stack runs at).
pub fn dump_with_thread_model(text: &str, filters: ThreadModel) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("thread_model=") {
            Some(plugin) => {
                let plugin = [
                    ThreadModel::SerializeConnections,
                    ThreadModel::SerializeAllRequests,
                    ThreadModel::SerializeRequests,
                    ThreadModel::Parallel,
                ]
                .into_iter()
                .find(|t| t.as_str() == plugin)
                .unwrap_or(ThreadModel::Parallel);
                format!("thread_model={}\n", plugin.min(filters).as_str())
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// The `--help` section of each named filter, as nbdkit prints them after its own help
/// (the filter's name, then the parameters it adds). Unknown names are an error.
pub fn help(names: &[String]) -> Result<String, UnknownFilter> {
    let mut out = String::new();
    for name in names {
        let spec = find(name)?;
        out.push_str(&format!(
            "\nfilter: {} (nbdkit {} filter)\n",
            spec.name, spec.name
        ));
        if !spec.help.is_empty() {
            out.push_str(spec.help);
            out.push('\n');
        }
    }
    Ok(out)
}

/// The `--filter` names in a command line (`--filter=X` or `--filter X`), for `--help`,
/// which clap answers before the rest is parsed.
pub fn names_in_args(args: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if let Some(n) = a.strip_prefix("--filter=") {
            names.push(n.to_string());
        } else if a == "--filter" {
            if let Some(n) = it.next() {
                names.push(n.clone());
            }
        }
    }
    names
}

/// Whether a filter error is a configuration mistake (exit 2) or a failure to start (1).
pub fn exit_code(e: &sluice_block::BlockError) -> i32 {
    if e.errno == Errno::EINVAL {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_key_goes_to_the_outermost_filter_that_owns_it_the_rest_to_the_plugin() {
        let params = ["1G", "logfile=/tmp/l", "limit=2", "size=5", "allow=all"]
            .iter()
            .map(|w| ConfigArg::parse(w))
            .collect();
        let (chosen, plugin) = route(&names(&["ip", "log", "limit"]), params).unwrap();
        let got: Vec<(&str, Vec<String>)> = chosen
            .filters
            .iter()
            .map(|(s, p)| (s.name, p.iter().map(|a| a.value.clone()).collect()))
            .collect();
        assert_eq!(
            got,
            [
                ("ip", vec!["all".to_string()]),
                ("log", vec!["/tmp/l".to_string()]),
                ("limit", vec!["2".to_string()])
            ]
        );
        let plugin: Vec<_> = plugin.iter().map(|a| a.value.as_str()).collect();
        assert_eq!(plugin, ["1G", "5"]);
    }

    #[test]
    fn a_key_owned_twice_goes_to_the_outermost() {
        let (chosen, _) = route(
            &names(&["limit", "limit"]),
            vec![ConfigArg::kv("limit", "3")],
        )
        .unwrap();
        assert_eq!(chosen.filters[0].1.len(), 1);
        assert!(chosen.filters[1].1.is_empty());
    }

    #[test]
    fn unknown_filters_and_shared_objects_are_named() {
        let e = route(&names(&["nosuch"]), vec![]).err().unwrap();
        assert!(e.to_string().starts_with("unknown filter 'nosuch'"), "{e}");
        let e = route(&names(&["./x.so"]), vec![]).err().unwrap();
        assert!(e.to_string().contains("C filters"), "{e}");
    }

    #[test]
    fn dump_thread_model_is_the_strictest() {
        let text = "name=memory\nthread_model=parallel\nmax_thread_model=parallel\n";
        assert_eq!(
            dump_with_thread_model(text, ThreadModel::SerializeRequests),
            "name=memory\nthread_model=serialize_requests\nmax_thread_model=parallel\n"
        );
    }

    #[test]
    fn filter_names_are_found_in_both_spellings() {
        let args = names(&["--filter=log", "-f", "--filter", "ip", "--", "--filter=x"]);
        assert_eq!(names_in_args(&args), ["log", "ip"]);
    }
}
