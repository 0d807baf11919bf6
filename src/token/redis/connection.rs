//! The connection to Redis: one server through a [`ConnectionManager`], or a Redis Cluster
//! through a cluster connection. Both are made lazily, at the first fetch, so a Redis that is
//! down at start-up delays nothing, and both reconnect by themselves.

use redis::{
    Client, Cmd, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};
use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

/// How to reach Redis, and the connection once made.
pub(super) struct Redis {
    connector: Connector,
    connection: OnceLock<Result<Connection, Arc<RedisError>>>,
}

/// What makes the connection.
enum Connector {
    Single(Client, ConnectionManagerConfig),
    Cluster(ClusterClient, ClusterConfig),
    /// The application gave the connection.
    Given,
}

/// A connection to one Redis server or to a Redis Cluster; cheap to clone.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Redis {
    /// One server at `url`, with `op_timeout` as its connection and response timeouts.
    pub(super) fn single(url: &str, op_timeout: Duration) -> Result<Self, RedisError> {
        // Fail fast: a Redis that does not answer is a Redis that is down, and the process
        // goes on without it; the next fetch tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(op_timeout);
        Ok(Self::new(Connector::Single(Client::open(url)?, config)))
    }

    /// A Redis Cluster whose nodes include those at `urls`.
    pub(super) fn cluster(urls: &[String], op_timeout: Duration) -> Result<Self, RedisError> {
        let client = ClusterClient::builder(urls.iter().map(String::as_str))
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(u64::try_from(op_timeout.as_millis()).unwrap_or(u64::MAX))
            .build()?;
        let config = ClusterConfig::new()
            .set_connection_timeout(op_timeout)
            .set_response_timeout(op_timeout);
        Ok(Self::new(Connector::Cluster(client, config)))
    }

    /// The connection the application gave.
    pub(super) fn given(connection: Connection) -> Self {
        Self {
            connector: Connector::Given,
            connection: OnceLock::from(Ok(connection)),
        }
    }

    fn new(connector: Connector) -> Self {
        Self {
            connector,
            connection: OnceLock::new(),
        }
    }

    /// The connection, made at the first call (within a Tokio runtime); an error to make it
    /// stays for every later call, as a URL that cannot work does not start to.
    pub(super) fn connection(&self) -> Result<Connection, Arc<RedisError>> {
        let made = self.connection.get_or_init(|| match &self.connector {
            Connector::Single(client, config) => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(Connection::Single)
                    .map_err(Arc::new)
            }
            Connector::Cluster(client, config) => Ok(Connection::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            )),
            // Set at construction: never reached.
            Connector::Given => Err(Arc::new(RedisError::from((
                redis::ErrorKind::Client,
                "no Redis client",
            )))),
        });
        made.clone()
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(con) => con.req_packed_command(cmd),
            Self::Cluster(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(con) => con.req_packed_commands(cmd, offset, count),
            Self::Cluster(con) => con.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(con) => con.get_db(),
            Self::Cluster(con) => con.get_db(),
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Connection::Single",
            Self::Cluster(_) => "Connection::Cluster",
        })
    }
}
