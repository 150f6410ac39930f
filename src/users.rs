//! Local users and their roles.
//!
//! Owns: who a local operator is and which roles they hold, behind one small interface
//! ([`Directory`]) so that sign-in with the hospital's identity provider can replace the local
//! list (`[[users]]` in node.toml) without touching the code that asks.
//!
//! Does not own: what a role allows (the callers decide, e.g. [`crate::reidentify`]), nor
//! authentication: today the operator who runs a command on the node's machine names themself,
//! and every such call is audited under that name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The role that lets a user ask for a token's original value at the origin.
pub const ROLE_REIDENTIFY: &str = "reidentify";

/// Longest user or role name accepted (they are written into audit entries).
pub const MAX_NAME_LEN: usize = 128;

/// One `[[users]]` entry of node.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user's name as they give it on the command line (`--user`).
    pub name: String,
    /// Roles: `reidentify`, and the roles agreements name in `reidentify_by`.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A known local user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub roles: BTreeSet<String>,
}

impl User {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(role)
    }
}

/// Where users are looked up.
pub trait Directory {
    /// The user called `name`, if known.
    fn find(&self, name: &str) -> Option<User>;
}

/// Why a `[[users]]` list is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsersError {
    #[error("user name `{0}` is declared twice in [[users]]")]
    Duplicate(String),
    #[error("[[users]] name `{0}` is not usable: names are 1-{MAX_NAME_LEN} printable characters")]
    BadName(String),
    #[error("role `{role}` of user `{user}` is not usable: roles are 1-{MAX_NAME_LEN} printable characters")]
    BadRole { user: String, role: String },
}

/// The users declared in node.toml.
#[derive(Debug, Clone, Default)]
pub struct LocalUsers {
    users: BTreeMap<String, User>,
}

fn usable(s: &str) -> bool {
    !s.trim().is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

impl LocalUsers {
    pub fn from_config(list: &[UserConfig]) -> Result<LocalUsers, UsersError> {
        let mut users = BTreeMap::new();
        for u in list {
            if !usable(&u.name) {
                return Err(UsersError::BadName(u.name.chars().take(40).collect()));
            }
            if let Some(role) = u.roles.iter().find(|r| !usable(r)) {
                return Err(UsersError::BadRole {
                    user: u.name.clone(),
                    role: role.chars().take(40).collect(),
                });
            }
            let user = User {
                name: u.name.clone(),
                roles: u.roles.iter().cloned().collect(),
            };
            if users.insert(u.name.clone(), user).is_some() {
                return Err(UsersError::Duplicate(u.name.clone()));
            }
        }
        Ok(LocalUsers { users })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

impl Directory for LocalUsers {
    fn find(&self, name: &str) -> Option<User> {
        self.users.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, roles: &[&str]) -> UserConfig {
        UserConfig {
            name: name.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn finds_users_and_roles() {
        let d = LocalUsers::from_config(&[cfg("dr-on-duty", &["reidentify"])]).unwrap();
        let u = d.find("dr-on-duty").unwrap();
        assert!(u.has_role(ROLE_REIDENTIFY));
        assert!(d.find("nobody").is_none());
    }

    #[test]
    fn refuses_duplicates_and_bad_names() {
        assert_eq!(
            LocalUsers::from_config(&[cfg("a", &[]), cfg("a", &[])]).unwrap_err(),
            UsersError::Duplicate("a".into())
        );
        assert!(LocalUsers::from_config(&[cfg(" ", &[])]).is_err());
        assert!(LocalUsers::from_config(&[cfg("x", &["bad\nrole"])]).is_err());
    }
}
