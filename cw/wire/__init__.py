"""The wire: what every peer shares below its role.  Frames and message
types, the handshake, the secret, the blocking link, out-of-band buffers,
and payload (the only module that pickles).  Imports nothing above it."""
