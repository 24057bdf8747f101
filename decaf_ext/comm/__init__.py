"""One agent's messages: the codec (message dtypes), the message layout, the guard (tags, bounds), the
transport (round membership, moving buffers) and one agent's round, all built by
:class:`~decaf_ext.comm.agent_comm.AgentComm`."""
