# Install the boot integration: the shell functions both builders use, the initramfs-tools hook and boot
# scripts, the dracut module, and the helper the hooks use to list what luks-tpm needs; and the
# request-key handler's configuration. The Python package itself comes with the Debian package (make deb),
# or is installed with pip for development.
#   make install [DESTDIR=/staging] [PREFIX=/usr] [LUKS_TPM=/usr/sbin/luks-tpm] [TCTI=device:/dev/tpmrm0]
#   make uninstall
#   make deb        -> dist/luks-tpm_<version>_<arch>.deb: everything in `install`, plus the command, its
#                      Python runtime, man page and completion (packaging/build-deb)
PREFIX ?= /usr
DESTDIR ?=
INITRAMFS_TOOLS ?= $(PREFIX)/share/initramfs-tools
DRACUT_MODULES ?= $(PREFIX)/lib/dracut/modules.d
LIBDIR ?= $(PREFIX)/lib/luks-tpm
REQUEST_KEY_D ?= /etc/request-key.d
SYSCONFDIR ?= /etc
SYSTEMD_UNITS ?= /lib/systemd/system
# The program and the TPM written into request-key.d/luks-tpm.conf (the kernel's helper needs absolute paths).
LUKS_TPM ?= $(PREFIX)/sbin/luks-tpm
TCTI ?= device:/dev/tpmrm0

# The hooks and boot scripts look for /usr/lib/luks-tpm/functions, i.e. the default LIBDIR.
INITRAMFS_SCRIPTS := local-top/luks-tpm local-bottom/luks-tpm panic/luks-tpm
# The boot-chain update hooks (docs/boot-chain.md): one script, run by thin hooks of the kernel packages
# (after zz-update-grub) and initramfs-tools, by the package's triggers, and by a service and path unit.
REBIND_UNITS := luks-tpm-rebind.service luks-tpm-rebind.path
DRACUT_FILES := module-setup.sh luks-tpm-dracut.sh luks-tpm-queue.sh luks-tpm-fence.sh luks-tpm-emergency.sh \
	luks-tpm.service \
	luks-tpm-fence.service

.PHONY: install uninstall deb
deb:
	scripts/bootstrap
	packaging/build-deb dist

install:
	install -D -m 0644 hooks/functions.sh $(DESTDIR)$(LIBDIR)/functions
	install -D -m 0644 hooks/initramfs/luks-tpm-files $(DESTDIR)$(LIBDIR)/luks-tpm-files
	install -D -m 0755 hooks/initramfs/hooks/luks-tpm $(DESTDIR)$(INITRAMFS_TOOLS)/hooks/luks-tpm
	install -D -m 0755 hooks/initramfs/scripts/local-top/luks-tpm $(DESTDIR)$(INITRAMFS_TOOLS)/scripts/local-top/luks-tpm
	# the fence: after the root is mounted, and before an emergency shell
	install -D -m 0755 hooks/initramfs/scripts/local-bottom/luks-tpm $(DESTDIR)$(INITRAMFS_TOOLS)/scripts/local-bottom/luks-tpm
	install -D -m 0755 hooks/initramfs/scripts/local-bottom/luks-tpm $(DESTDIR)$(INITRAMFS_TOOLS)/scripts/panic/luks-tpm
	for f in $(DRACUT_FILES); do \
		case $$f in *.sh) mode=0755 ;; *) mode=0644 ;; esac; \
		install -D -m $$mode dracut/90luks-tpm/$$f $(DESTDIR)$(DRACUT_MODULES)/90luks-tpm/$$f || exit 1; \
	done
	install -D -m 0755 hooks/rebind/luks-tpm-rebind $(DESTDIR)$(LIBDIR)/luks-tpm-rebind
	install -D -m 0755 hooks/rebind/kernel $(DESTDIR)$(SYSCONFDIR)/kernel/postinst.d/zzz-luks-tpm
	install -D -m 0755 hooks/rebind/kernel $(DESTDIR)$(SYSCONFDIR)/kernel/postrm.d/zzz-luks-tpm
	install -D -m 0755 hooks/rebind/initramfs $(DESTDIR)$(SYSCONFDIR)/initramfs/post-update.d/luks-tpm
	for f in $(REBIND_UNITS); do install -D -m 0644 systemd/$$f $(DESTDIR)$(SYSTEMD_UNITS)/$$f || exit 1; done
	install -d $(DESTDIR)$(REQUEST_KEY_D)
	sed -e 's|/usr/sbin/luks-tpm --tcti device:/dev/tpmrm0 |$(LUKS_TPM) --tcti $(TCTI) |' \
		etc/request-key.d/luks-tpm.conf > $(DESTDIR)$(REQUEST_KEY_D)/luks-tpm.conf
	chmod 0644 $(DESTDIR)$(REQUEST_KEY_D)/luks-tpm.conf

uninstall:
	rm -f $(DESTDIR)$(INITRAMFS_TOOLS)/hooks/luks-tpm
	rm -f $(addprefix $(DESTDIR)$(INITRAMFS_TOOLS)/scripts/,$(INITRAMFS_SCRIPTS))
	rm -f $(DESTDIR)$(LIBDIR)/functions $(DESTDIR)$(LIBDIR)/luks-tpm-files
	rm -f $(addprefix $(DESTDIR)$(DRACUT_MODULES)/90luks-tpm/,$(DRACUT_FILES))
	-rmdir $(DESTDIR)$(DRACUT_MODULES)/90luks-tpm 2>/dev/null
	rm -f $(DESTDIR)$(REQUEST_KEY_D)/luks-tpm.conf
	rm -f $(DESTDIR)$(LIBDIR)/luks-tpm-rebind $(DESTDIR)$(SYSCONFDIR)/initramfs/post-update.d/luks-tpm
	rm -f $(DESTDIR)$(SYSCONFDIR)/kernel/postinst.d/zzz-luks-tpm $(DESTDIR)$(SYSCONFDIR)/kernel/postrm.d/zzz-luks-tpm
	rm -f $(addprefix $(DESTDIR)$(SYSTEMD_UNITS)/,$(REBIND_UNITS))
	-rmdir $(DESTDIR)$(LIBDIR) 2>/dev/null
