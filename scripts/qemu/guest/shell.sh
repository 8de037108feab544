# An interactive shell on the console (scripts/qemu/run-vm.sh --mode shell).
# Leave it with "exit": the VM powers off.
. /vmtest/lib.sh
info "interactive shell; 'exit' powers the VM off"
setsid cttyhack sh -l </dev/console >/dev/console 2>&1
exit 0
