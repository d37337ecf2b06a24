from advinterp.cli import main

raise SystemExit(main())
