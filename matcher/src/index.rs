//! Which integrations a chat event triggers (docs/contract.md §2), without scanning
//! every integration per event.
//!
//! Integrations are indexed by team, then by channel id and channel name, and
//! (for integrations with no channel) by trigger word. A lookup costs a few
//! hash probes: one per distinct trigger-word length for prefix matching, one
//! for word matching, one per channel key. Only integrations that can match
//! are looked at. An event outside public channels (a private channel, a DM)
//! fires only integrations whose `channel_types` allow its kind.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use swallow_shared::config::{ChannelRef, ChannelType, Integration, Integrations, TriggerMatch};
use swallow_shared::wire::event::ChatEvent;

/// One integration an event triggered, and the trigger word that matched
/// (empty when the channel alone matched).
#[derive(Debug, Clone)]
pub struct Match {
    pub integration: Arc<Integration>,
    pub trigger_word: String,
}

/// Why an event triggered nothing (bounded metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    Bot,
    /// No integration that matched allows the event's kind of channel.
    NotPublic,
    NoMatch,
}

impl Ignored {
    pub fn reason(self) -> &'static str {
        match self {
            Ignored::Bot => "bot",
            Ignored::NotPublic => "not_public",
            Ignored::NoMatch => "no_match",
        }
    }
}

/// Trigger words of channel-less integrations, keyed for lookup.
#[derive(Default)]
struct TriggerIndex {
    /// Prefix words, lower-cased, and the distinct byte lengths among them.
    prefix_folded: HashMap<String, Vec<usize>>,
    prefix_folded_lengths: BTreeSet<usize>,
    prefix_exact: HashMap<String, Vec<usize>>,
    prefix_exact_lengths: BTreeSet<usize>,
    /// Whole-first-word words.
    word_folded: HashMap<String, Vec<usize>>,
    word_exact: HashMap<String, Vec<usize>>,
}

#[derive(Default)]
struct TeamIndex {
    by_channel_id: HashMap<String, Vec<usize>>,
    by_channel_name: HashMap<String, Vec<usize>>,
    any_channel: TriggerIndex,
}

/// The integrations in force, indexed for matching.
#[derive(Default)]
pub struct IntegrationIndex {
    integrations: Vec<Arc<Integration>>,
    teams: HashMap<String, TeamIndex>,
    /// Whether any integration fires outside public channels.
    any_non_public: bool,
}

impl IntegrationIndex {
    pub fn new(integrations: &Integrations) -> Self {
        let mut index = IntegrationIndex {
            integrations: integrations.list.clone(),
            teams: HashMap::new(),
            any_non_public: integrations
                .list
                .iter()
                .any(|i| i.channel_types.iter().any(|t| *t != ChannelType::Public)),
        };
        for (i, integration) in integrations.list.iter().enumerate() {
            let team = index.teams.entry(integration.team_id.clone()).or_default();
            match &integration.channel {
                Some(ChannelRef::Id(id)) => team.by_channel_id.entry(id.clone()).or_default().push(i),
                Some(ChannelRef::Name(name)) => team.by_channel_name.entry(name.clone()).or_default().push(i),
                None => {
                    let t = &mut team.any_channel;
                    for word in &integration.trigger_words {
                        let (map, lengths, key) = match (integration.trigger_match, integration.case_sensitive) {
                            (TriggerMatch::Prefix, false) => (
                                &mut t.prefix_folded,
                                Some(&mut t.prefix_folded_lengths),
                                word.to_lowercase(),
                            ),
                            (TriggerMatch::Prefix, true) => {
                                (&mut t.prefix_exact, Some(&mut t.prefix_exact_lengths), word.clone())
                            }
                            (TriggerMatch::Word, false) => (&mut t.word_folded, None, word.to_lowercase()),
                            (TriggerMatch::Word, true) => (&mut t.word_exact, None, word.clone()),
                        };
                        if let Some(lengths) = lengths {
                            lengths.insert(key.len());
                        }
                        let entry = map.entry(key).or_default();
                        if !entry.contains(&i) {
                            entry.push(i);
                        }
                    }
                }
            }
        }
        index
    }

    pub fn len(&self) -> usize {
        self.integrations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.integrations.is_empty()
    }

    /// Every integration `event` triggers, in configuration order, or why none.
    pub fn match_event(&self, event: &ChatEvent) -> Result<Vec<Match>, Ignored> {
        if event.is_from_bot() {
            return Err(Ignored::Bot);
        }
        let kind = ChannelType::of_event(event.channel_type.as_deref());
        let Some(kind) = kind.filter(|k| *k == ChannelType::Public || self.any_non_public) else {
            return Err(Ignored::NotPublic);
        };
        let Some(team) = self.teams.get(&event.team_id) else {
            return Err(Ignored::NoMatch);
        };
        let text = event.text.trim_start();
        let mut found: Vec<(usize, Match)> = Vec::new();

        let by_channel = team
            .by_channel_id
            .get(&event.channel_id)
            .into_iter()
            .chain(team.by_channel_name.get(&event.channel_name))
            .chain(event.channel_alias.as_ref().and_then(|a| team.by_channel_name.get(a)))
            .flatten();
        for &i in by_channel {
            let integration = &self.integrations[i];
            if found.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let trigger_word = if integration.trigger_words.is_empty() {
                Some(String::new())
            } else {
                longest_trigger(integration, text).map(str::to_owned)
            };
            if let Some(trigger_word) = trigger_word {
                let integration = integration.clone();
                found.push((
                    i,
                    Match {
                        integration,
                        trigger_word,
                    },
                ));
            }
        }

        let candidates = team.any_channel.candidates(text);
        for i in candidates {
            let integration = &self.integrations[i];
            if let Some(word) = longest_trigger(integration, text) {
                let integration = integration.clone();
                found.push((
                    i,
                    Match {
                        integration,
                        trigger_word: word.to_owned(),
                    },
                ));
            }
        }
        if found.is_empty() {
            return Err(Ignored::NoMatch);
        }
        found.retain(|(_, m)| m.integration.channel_types.contains(&kind));
        if found.is_empty() {
            return Err(Ignored::NotPublic);
        }
        found.sort_unstable_by_key(|(i, _)| *i);
        Ok(found.into_iter().map(|(_, m)| m).collect())
    }
}

impl TriggerIndex {
    /// The integrations (by index) one of whose words may start `text`,
    /// sorted and without repeats; `longest_trigger` has the last word.
    fn candidates(&self, text: &str) -> Vec<usize> {
        let mut candidates: Vec<usize> = Vec::new();
        if !self.prefix_folded.is_empty() || !self.word_folded.is_empty() {
            let longest = self.prefix_folded_lengths.last().copied().unwrap_or(0);
            // Fold only as much of the text as the longest word can cover
            // (lower-casing can change byte lengths, so take a char margin).
            let head: String = text.chars().take(longest + 1).collect::<String>().to_lowercase();
            for &len in &self.prefix_folded_lengths {
                if let Some(key) = head.get(..len) {
                    candidates.extend(self.prefix_folded.get(key).into_iter().flatten());
                }
            }
            if !self.word_folded.is_empty() {
                let first = first_word(text).to_lowercase();
                candidates.extend(self.word_folded.get(&first).into_iter().flatten());
            }
        }
        for &len in &self.prefix_exact_lengths {
            if let Some(key) = text.get(..len) {
                candidates.extend(self.prefix_exact.get(key).into_iter().flatten());
            }
        }
        if !self.word_exact.is_empty() {
            candidates.extend(self.word_exact.get(first_word(text)).into_iter().flatten());
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
    }
}

fn first_word(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or("")
}

/// The longest of the integration's trigger words that `text` begins with.
fn longest_trigger<'a>(integration: &'a Integration, text: &str) -> Option<&'a str> {
    integration
        .trigger_words
        .iter()
        .filter(|word| trigger_matches(integration, word, text))
        .max_by_key(|word| word.len())
        .map(String::as_str)
}

fn trigger_matches(integration: &Integration, word: &str, text: &str) -> bool {
    match integration.trigger_match {
        TriggerMatch::Prefix => match text.get(..word.len()) {
            Some(head) if integration.case_sensitive => head == word,
            Some(head) if head.eq_ignore_ascii_case(word) => true,
            _ => {
                !integration.case_sensitive
                    && text
                        .chars()
                        .take(word.chars().count())
                        .collect::<String>()
                        .to_lowercase()
                        == word.to_lowercase()
            }
        },
        TriggerMatch::Word => {
            let first = first_word(text);
            if integration.case_sensitive {
                first == word
            } else {
                first.to_lowercase() == word.to_lowercase()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swallow_shared::Config;

    fn index(integrations: &str) -> IntegrationIndex {
        let config = Config::parse(integrations, None).expect("test config is valid");
        IntegrationIndex::new(&config.integrations)
    }

    fn event(text: &str) -> ChatEvent {
        ChatEvent {
            team_id: "T1".into(),
            team_domain: "example".into(),
            channel_id: "C1".into(),
            channel_name: "general".into(),
            channel_type: None,
            user_id: "U1".into(),
            user_name: "Steve".into(),
            ts: "1355517523.000005".into(),
            thread_ts: None,
            text: text.into(),
            bot_id: None,
            subtype: None,
            platform: None,
            event_id: None,
            channel_alias: None,
        }
    }

    /// (ids that fire, with their trigger word) or the reason none does.
    type Fired = Result<Vec<(String, String)>, Ignored>;

    fn fired(index: &IntegrationIndex, e: &ChatEvent) -> Fired {
        index.match_event(e).map(|ms| {
            ms.into_iter()
                .map(|m| (m.integration.id.clone(), m.trigger_word))
                .collect()
        })
    }

    fn integ(id: &str, extra: &str) -> String {
        format!(
            "[[integrations]]\nid = \"{id}\"\nteam_id = \"T1\"\nurls = [\"http://127.0.0.1:1/\"]\ntoken = \"t\"\n{extra}\n"
        )
    }

    #[test]
    fn trigger_word_rules() {
        let idx = index(
            &[
                integ("prefix", "trigger_words = [\"googlebot:\"]"),
                integ("word", "trigger_words = [\"deploy\"]\ntrigger_match = \"word\""),
                integ("exact", "trigger_words = [\"Ship\"]\ncase_sensitive = true"),
                integ(
                    "exactword",
                    "trigger_words = [\"Run\"]\ncase_sensitive = true\ntrigger_match = \"word\"",
                ),
                integ("longest", "trigger_words = [\"zz\", \"zzyzx\", \"zzyz\"]"),
            ]
            .concat(),
        );
        let ok = |id: &str, w: &str| Ok(vec![(id.to_owned(), w.to_owned())]);
        let cases: Vec<(&str, Fired)> = vec![
            ("googlebot: what?", ok("prefix", "googlebot:")),
            ("GoogleBot: what?", ok("prefix", "googlebot:")),
            ("googlebot:what", ok("prefix", "googlebot:")),
            ("  googlebot: leading spaces", ok("prefix", "googlebot:")),
            ("googlebot:\nnewline after", ok("prefix", "googlebot:")),
            ("hey googlebot: not at start", Err(Ignored::NoMatch)),
            ("deploy now", ok("word", "deploy")),
            ("DEPLOY now", ok("word", "deploy")),
            ("deploy\nnow", ok("word", "deploy")),
            ("\tdeploy", ok("word", "deploy")),
            ("deployment now", Err(Ignored::NoMatch)),
            ("Ship it", ok("exact", "Ship")),
            ("ship it", Err(Ignored::NoMatch)),
            ("Shipping", ok("exact", "Ship")),
            ("Run it", ok("exactword", "Run")),
            ("run it", Err(Ignored::NoMatch)),
            ("Runner", Err(Ignored::NoMatch)),
            ("zzyzx road", ok("longest", "zzyzx")),
            ("zzyzz", ok("longest", "zzyz")),
            ("ZZ", ok("longest", "zz")),
            ("", Err(Ignored::NoMatch)),
        ];
        for (text, want) in cases {
            assert_eq!(fired(&idx, &event(text)), want, "text {text:?}");
        }
    }

    #[test]
    fn channel_rules() {
        let idx = index(
            &[
                integ("by-id", "channel = \"C1\""),
                integ("by-name", "channel = \"#general\""),
                integ("other-channel", "channel = \"C9\""),
                integ("both", "channel = \"C1\"\ntrigger_words = [\"bot:\"]"),
                integ("both-elsewhere", "channel = \"C9\"\ntrigger_words = [\"bot:\"]"),
            ]
            .concat(),
        );
        assert_eq!(
            fired(&idx, &event("hello")),
            Ok(vec![("by-id".into(), "".into()), ("by-name".into(), "".into())])
        );
        assert_eq!(
            fired(&idx, &event("bot: hi")),
            Ok(vec![
                ("by-id".into(), "".into()),
                ("by-name".into(), "".into()),
                ("both".into(), "bot:".into())
            ])
        );
        let mut renamed = event("hello");
        renamed.channel_name = "random".into();
        assert_eq!(fired(&idx, &renamed), Ok(vec![("by-id".into(), "".into())]));
        let mut elsewhere = event("bot: hi");
        elsewhere.channel_id = "C9".into();
        elsewhere.channel_name = "x".into();
        assert_eq!(
            fired(&idx, &elsewhere),
            Ok(vec![
                ("other-channel".into(), "".into()),
                ("both-elsewhere".into(), "bot:".into())
            ])
        );
    }

    #[test]
    fn matrix_rooms_by_id_or_alias() {
        let idx = index(
            &[
                integ("by-room-id", "channel = \"!r:example.org\""),
                integ("by-alias", "channel = \"#test:example.org\""),
                integ("by-name", "channel = \"#test\""),
            ]
            .concat(),
        );
        let mut e = event("hello");
        e.channel_id = "!r:example.org".into();
        e.channel_name = "Test Room".into();
        e.channel_alias = Some("#test:example.org".into());
        assert_eq!(
            fired(&idx, &e),
            Ok(vec![("by-room-id".into(), "".into()), ("by-alias".into(), "".into())]),
            "an alias matches the room's canonical alias, whatever its name"
        );
        e.channel_alias = None;
        e.channel_name = "test".into();
        assert_eq!(
            fired(&idx, &e),
            Ok(vec![("by-room-id".into(), "".into()), ("by-name".into(), "".into())])
        );
        let err = Config::parse(&integ("x", "channel = \"#:example.org\""), None).unwrap_err();
        assert!(err.to_string().contains("#room:server"), "{err}");
    }

    #[test]
    fn channel_types_let_an_integration_fire_in_private_channels_and_dms() {
        let idx = index(
            &[
                integ("public", "trigger_words = [\"bot:\"]"),
                integ("private", "trigger_words = [\"bot:\"]\nchannel_types = [\"private\"]"),
                integ(
                    "dms",
                    "channel = \"C1\"\nchannel_types = [\"im\", \"mpim\", \"public\"]",
                ),
            ]
            .concat(),
        );
        let ids = |kind: Option<&str>| {
            let mut e = event("bot: hi");
            e.channel_type = kind.map(str::to_owned);
            fired(&idx, &e).map(|v| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>())
        };
        assert_eq!(ids(None), Ok(vec!["public".to_owned(), "dms".to_owned()]));
        assert_eq!(ids(Some("public")), Ok(vec!["public".to_owned(), "dms".to_owned()]));
        assert_eq!(ids(Some("private")), Ok(vec!["private".to_owned()]));
        assert_eq!(ids(Some("im")), Ok(vec!["dms".to_owned()]));
        assert_eq!(ids(Some("mpim")), Ok(vec!["dms".to_owned()]));
        assert_eq!(ids(Some("voice")), Err(Ignored::NotPublic));
        let mut unmatched = event("nothing here");
        unmatched.channel_id = "C9".into();
        unmatched.channel_type = Some("im".into());
        assert_eq!(fired(&idx, &unmatched), Err(Ignored::NoMatch));
    }

    #[test]
    fn teams_privacy_and_bots() {
        let idx = index(&[integ("a", "trigger_words = [\"bot:\"]"), integ("b", "channel = \"C1\"")].concat());
        let mut other_team = event("bot: hi");
        other_team.team_id = "T2".into();
        assert_eq!(fired(&idx, &other_team), Err(Ignored::NoMatch));
        for kind in ["private", "im", "mpim"] {
            let mut private = event("bot: hi");
            private.channel_type = Some(kind.into());
            assert_eq!(fired(&idx, &private), Err(Ignored::NotPublic));
        }
        let mut public = event("bot: hi");
        public.channel_type = Some("public".into());
        assert_eq!(fired(&idx, &public).unwrap().len(), 2);
        let mut unknown = event("bot: hi");
        unknown.channel_type = Some("voice".into());
        assert_eq!(fired(&idx, &unknown), Err(Ignored::NotPublic));
        let mut bot = event("bot: hi");
        bot.bot_id = Some("B1".into());
        assert_eq!(fired(&idx, &bot), Err(Ignored::Bot));
        let mut bot_message = event("bot: hi");
        bot_message.subtype = Some("bot_message".into());
        assert_eq!(fired(&idx, &bot_message), Err(Ignored::Bot));
        let mut other_subtype = event("bot: hi");
        other_subtype.subtype = Some("me_message".into());
        assert_eq!(fired(&idx, &other_subtype).unwrap().len(), 2);
    }

    #[test]
    fn several_integrations_fire_and_share_words() {
        let idx = index(
            &[
                integ("one", "trigger_words = [\"bot:\"]"),
                integ("two", "trigger_words = [\"BOT:\", \"bot: please\"]"),
                integ("three", "trigger_words = [\"bot:\"]\ncase_sensitive = true"),
            ]
            .concat(),
        );
        assert_eq!(
            fired(&idx, &event("bot: please help")),
            Ok(vec![
                ("one".into(), "bot:".into()),
                ("two".into(), "bot: please".into()),
                ("three".into(), "bot:".into())
            ])
        );
    }

    #[test]
    fn non_ascii_text_and_words() {
        let idx = index(&integ("u", "trigger_words = [\"ÉCOLE\", \"straße\"]"));
        assert_eq!(
            fired(&idx, &event("école: ouverte")),
            Ok(vec![("u".into(), "ÉCOLE".into())])
        );
        assert_eq!(fired(&idx, &event("STRASSE")), Err(Ignored::NoMatch));
        assert_eq!(fired(&idx, &event("Straße 1")), Ok(vec![("u".into(), "straße".into())]));
        assert_eq!(fired(&idx, &event("é")), Err(Ignored::NoMatch));
    }
}
