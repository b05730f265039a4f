from regproxy.cli import main

raise SystemExit(main())
