# Sourced by the CPU demos: one single-threaded XLA device per core (1, 2 or 4; the demos'
# batches split evenly), data-parallel. On 2 cores: 1.45x the digits demo's training
# throughput and 1.75x CFG's sampling throughput of one multi-threaded device. Ignored on a
# GPU or TPU.
CORES=$(nproc)
DEVICES=$(( CORES >= 4 ? 4 : (CORES >= 2 ? 2 : 1) ))
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES --xla_cpu_multi_thread_eigen=false"
