package linkemu

// sysSetns is SYS_SETNS, which package syscall lacks.
const sysSetns = 268
