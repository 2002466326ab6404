from fastnl.cli import main

raise SystemExit(main())
