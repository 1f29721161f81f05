"""Every default timeout and limit of cw, in one place.

Each is the default of a command-line option or keyword argument (named in
the comment); the README's "Failures and guarantees" table lists them.
"""

#: Seconds a new connection has to authenticate and say HELLO (master --handshake-timeout).
HANDSHAKE_TIMEOUT = 10.0
#: Largest frame before authentication, in bytes: all an unknown peer can make the master hold.
PREAUTH_MAX_FRAME = 4096
#: Largest HELLO frame (JSON), in bytes.
MAX_HELLO = 64 * 1024
#: Largest frame after authentication (a job's call or result), in bytes.
MAX_FRAME = 1 << 30

#: Seconds between the master's PINGs to every peer (master --heartbeat).
HEARTBEAT_INTERVAL = 5.0
#: Seconds of silence after which a peer is declared lost: the master drops a
#: worker (its job runs elsewhere) or a client; a worker or client drops the
#: master (master --peer-timeout; the master tells its peers).
PEER_TIMEOUT = 30.0

#: Jobs a worker holds at once: the one it runs and the next ones, sent ahead so
#: that it never waits a round trip between jobs (master --slots; 1: no prefetch).
WORKER_SLOTS = 2
#: A worker whose last QUICK_STREAK jobs each ended within QUICK_JOB seconds of
#: the one before holds twice WORKER_SLOTS: with jobs a few round trips long,
#: jobs then reach it several to a message and the master reads several
#: outcomes per wake-up (fewer wake-ups, and under TLS fewer records).
#: QUICK_JOB is generous enough that a worker preempted for a time slice on a
#: busy machine keeps its streak; one slower job takes it back to WORKER_SLOTS.
QUICK_JOB = 5e-3
QUICK_STREAK = 16
#: Seconds a worker has to answer a REVOKE of a job sent ahead (a more urgent
#: job wants its place, or an idle worker its job) before the job is given to
#: another worker all the same; a late start of it there is dropped.  A frozen
#: machine then holds only the job it runs until the peer timeout (master
#: --revoke-timeout).
REVOKE_TIMEOUT = 3.0

#: Seconds a job waits when no connected worker could ever run it (it asks for
#: more than any machine has, or names workers that are gone) before it fails
#: with Unplaceable; workers that fit may join meanwhile (master --unplaceable-timeout).
UNPLACEABLE_TIMEOUT = 300.0

#: Characters of a job's output (print, logging) that come back to its client:
#: the first and last halves, with a note of what was dropped between.
MAX_JOB_OUTPUT = 1 << 20

#: Attempts a job gets when its worker dies under it (client max_retries + 1).
MAX_ATTEMPTS = 3

#: Seconds a worker keeps trying to reach a master before it exits (worker --connect-timeout).
WORKER_CONNECT_TIMEOUT = 60.0
#: Seconds a client keeps trying to reach its master when it starts (connect_timeout=).
CLIENT_CONNECT_TIMEOUT = 10.0
#: Seconds a client that lost its master keeps its unfinished futures and
#: tries to reach a master again (the same one back, or a new one the address
#: file names) before they fail with BrokenCluster (reconnect_timeout=; 0:
#: fail at once).  A minute covers a master restarted in place or by SLURM.
CLIENT_RECONNECT_TIMEOUT = 60.0
#: Functions sent once (by digest) a worker process keeps unpickled, least
#: recently used out first (environment variable CW_WORKER_FUNCTIONS).
WORKER_FUNCTIONS = 256
#: map() keeps at most this many chunks in flight (map(window=)).
MAP_WINDOW = 256
#: Seconds status() waits for the master's answer.
STATUS_TIMEOUT = 10.0

#: Bytes waiting to be written to one peer before the master stops reading from
#: it and holds back its jobs (flow control for clients that do not read).
WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 1 * 1024 * 1024

#: Listen backlog: thousands of workers may connect at once when a cluster starts.
BACKLOG = 4096
#: Connections the master holds that have not authenticated yet, in total (at
#: most a quarter of its descriptor limit) and from one source address; past
#: either it closes the oldest of the address holding the most (cw.master.admission).
MAX_UNAUTHENTICATED = 1024
MAX_UNAUTHENTICATED_PER_SOURCE = 128

#: Bytes of kept values (put, futures passed as arguments) a master holds at
#: most (its --kept-bytes); beyond, a put fails (see cw.master.kept).
KEPT_BYTES = 4 * 1024 ** 3
